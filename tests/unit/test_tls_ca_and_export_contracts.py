"""What a request may carry to the steps: a CA as PEM text (never a path), exports only to allowed buckets."""

from __future__ import annotations

from pathlib import Path

import pytest
from cachevault.core import export_buckets
from cachevault.core.errors import InvalidParameterValue
from cachevault.nodes import credentials

PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n"


def test_a_ca_path_in_a_request_is_refused_with_the_way_to_send_it() -> None:
    with pytest.raises(InvalidParameterValue, match=r"PEM text.*--tls-ca-file reads the file"):
        credentials.security_fields({"TransitEncryptionEnabled": True, "TlsCaBundle": "/home/me/ca.pem"})
    fields = credentials.security_fields({"TransitEncryptionEnabled": True, "TlsCaBundle": PEM})
    assert fields["TlsCaBundle"] == PEM


def test_a_record_with_a_ca_path_is_refused_when_credentials_are_resolved() -> None:
    with pytest.raises(InvalidParameterValue, match="PEM text"):
        credentials.for_cache({"TransitEncryptionEnabled": True, "TlsCaBundle": "ca.pem"})
    tls = credentials.for_cache({"TransitEncryptionEnabled": True, "TlsCaBundle": PEM}).tls
    assert tls is not None and tls.ca_pem == PEM and tls.ca_file is None


def test_the_cli_reads_the_ca_file_and_sends_its_pem(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(PEM)
    assert credentials.read_ca_file(ca) == PEM
    ca.write_text("not a certificate")
    with pytest.raises(InvalidParameterValue, match="PEM text"):
        credentials.read_ca_file(ca)
    with pytest.raises(InvalidParameterValue, match="Cannot read the CA file"):
        credentials.read_ca_file(tmp_path / "missing.pem")


def test_tls_nodes_get_the_ca_as_pem_text_never_a_path_of_the_step() -> None:
    files = credentials.fleet_tls(
        {"TransitEncryptionEnabled": True, "TlsCaBundle": PEM, "TlsCertificateFile": "n.pem", "TlsKeyFile": "n.key"}
    )
    # The step runs in a Lambda whose files no node task can read: the task gets the text.
    assert files is not None and files["ca_pem"] == PEM and "ca_file" not in files
    assert files["cert_file"] == "n.pem" and files["key_file"] == "n.key"


def test_export_only_into_allow_listed_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(export_buckets.ALLOW_LIST_ENV, raising=False)
    with pytest.raises(InvalidParameterValue, match="allows no export buckets"):
        export_buckets.check_allowed("anything")
    monkeypatch.setenv(export_buckets.ALLOW_LIST_ENV, "acme-backups,acme-exports-*,*")
    assert export_buckets.check_allowed("acme-backups") == "acme-backups"
    assert export_buckets.check_allowed("acme-exports-eu") == "acme-exports-eu"
    for refused in ("acme-backups2", "other", "acme-export"):
        with pytest.raises(InvalidParameterValue, match="not in this deployment's ExportBucketAllowList"):
            export_buckets.check_allowed(refused)
    assert export_buckets.allow_list() == ["acme-backups", "acme-exports-*"]  # a bare "*" never counts


def test_every_export_call_names_the_expected_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(export_buckets.OWNER_ENV, "123456789012")
    assert export_buckets.owner_args() == {"ExpectedBucketOwner": "123456789012"}
    monkeypatch.setenv(export_buckets.OWNER_ENV, "")
    assert export_buckets.owner_args() == {}
