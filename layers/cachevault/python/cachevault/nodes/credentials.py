"""Credentials and TLS settings for talking to a cache's nodes, resolved from the registry.

A cache record never holds a password. It names where the password lives:

* ``AuthSecretArn``: a Secrets Manager secret, JSON ``{"username": ..., "password": ...}``
  (``username`` optional: plain ``AUTH <password>``) or a bare password string;
* ``AuthParameterName``: an SSM SecureString parameter with the same content.

``TransitEncryptionEnabled`` (ElastiCache's name) turns on TLS; the server certificate is
checked against ``TlsCaBundle`` (PEM text, never a file path: the steps that read it run
where no file of the requester's machine exists; the CLI reads ``--tls-ca-file`` and sends
its PEM) or a ``ca`` field of the secret. Values are read with Powertools parameters (cached ``max_age`` seconds, so a
Map of 50 shards reads the secret once per warm Lambda). State machine payloads carry the
cache name only: each step resolves the credentials itself, so no secret ever lands in an
execution history, a log line or a manifest. ``Credentials.__repr__`` masks the password.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from cachevault.core.errors import InvalidParameterValue

MAX_AGE_S = 60  # a rotated secret is picked up within a minute
_PEM_MARK = "-----BEGIN"


@dataclass(frozen=True)
class Tls:
    """Verify the node's certificate against ``ca_file`` / ``ca_pem`` (system CAs if neither)."""

    ca_file: str | None = None
    ca_pem: str | None = field(default=None, repr=False)
    server_name: str | None = None  # name checked against the certificate; default: the host dialled
    check_hostname: bool = True

    @cached_property
    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_pem)
        ctx.check_hostname = self.check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def wrap(self, sock: socket.socket, host: str) -> ssl.SSLSocket:
        """TLS handshake on a connected socket; ``TlsError`` (an OSError) says why it failed."""
        try:
            return self.context.wrap_socket(sock, server_hostname=self.server_name or host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise TlsError(f"TLS certificate of {host} refused: {exc.verify_message} ({self.describe_ca()})") from exc
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise TlsError(f"TLS handshake with {host} failed: {exc}") from exc

    def describe_ca(self) -> str:
        if self.ca_file:
            return f"CA bundle {self.ca_file}"
        return "CA given as PEM" if self.ca_pem else "system CA store"

    def redis_kwargs(self) -> dict[str, Any]:
        return {
            "ssl": True,
            "ssl_ca_certs": self.ca_file,
            "ssl_ca_data": self.ca_pem,
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": self.check_hostname and not self.server_name,
        }


class TlsError(OSError):
    """The TLS handshake or certificate check failed (callers turn it into their own fault)."""


@dataclass(frozen=True)
class Credentials:
    """What a connection to one cache's nodes needs. ``repr`` never shows the password."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: Tls | None = None

    def __repr__(self) -> str:
        secret = "***" if self.password is not None else None
        return f"Credentials(username={self.username!r}, password={secret}, tls={self.tls is not None})"

    __str__ = __repr__

    @property
    def auth_args(self) -> tuple[str, ...] | None:
        """The AUTH command's arguments, or None when the node needs none."""
        if self.password is None:
            return None
        return ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)

    def redis_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis`` (control connections)."""
        kwargs: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.tls is not None:
            kwargs.update(self.tls.redis_kwargs())
        return kwargs

    def connect(self, host: str, port: int, timeout: float) -> socket.socket:
        """A raw TCP (or TLS) socket to a node, for the replication and RESTORE streams."""
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is None:
            return sock
        return self.tls.wrap(sock, host)


NONE = Credentials()


def merge(credentials: Credentials | None, username: str | None, password: str | None) -> Credentials:
    """Explicit ``username``/``password`` arguments (the older API) on top of ``credentials``."""
    base = credentials or NONE
    if username is None and password is None:
        return base
    return Credentials(username or base.username, password if password is not None else base.password, base.tls)


# --------------------------------------------------------------------------- resolving
_providers: dict[tuple[str, int], Any] = {}
_lock = threading.Lock()


def _provider(kind: str) -> Any:
    """One Powertools provider per boto3 client (aws.client caches those per endpoint)."""
    from aws_lambda_powertools.utilities.parameters import SecretsProvider, SSMProvider

    from cachevault.core.aws import client

    boto = client("secretsmanager" if kind == "secrets" else "ssm")
    key = (kind, id(boto))
    with _lock:
        if key not in _providers:
            cls = SecretsProvider if kind == "secrets" else SSMProvider
            _providers[key] = cls(boto3_client=boto)
        return _providers[key]


def _parse(raw: str | bytes | None, where: str) -> dict[str, str]:
    if raw is None:
        raise InvalidParameterValue(f"{where} is empty.")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError:
            # Never echo the value: it is a secret.
            raise InvalidParameterValue(f"{where} is not valid JSON.") from None
        if not isinstance(data, dict) or not data.get("password"):
            raise InvalidParameterValue(f'{where} must hold a JSON object with a non-empty "password".')
        return {k: str(v) for k, v in data.items() if v is not None}
    if not stripped:
        raise InvalidParameterValue(f"{where} is empty.")
    return {"password": text}


def read_secret(arn: str, *, force: bool = False) -> dict[str, str]:
    try:
        raw = _provider("secrets").get(arn, max_age=MAX_AGE_S, force_fetch=force)
    except Exception as exc:  # GetParameterError wraps the client error; keep its message only
        raise InvalidParameterValue(f"Cannot read the cache's credentials from secret {arn}: {exc}") from None
    return _parse(raw, f"Secret {arn}")


def read_parameter(name: str, *, force: bool = False) -> dict[str, str]:
    try:
        raw = _provider("ssm").get(name, max_age=MAX_AGE_S, force_fetch=force, decrypt=True)
    except Exception as exc:
        raise InvalidParameterValue(f"Cannot read the cache's credentials from parameter {name}: {exc}") from None
    return _parse(raw, f"Parameter {name}")


def check_ca_pem(bundle: str, what: str = "TlsCaBundle") -> str:
    """``bundle`` if it is PEM text (one or more certificates), else InvalidParameterValue."""
    if not bundle.lstrip().startswith(_PEM_MARK) or "-----END" not in bundle:
        shown = bundle if len(bundle) <= 80 else bundle[:77] + "..."
        raise InvalidParameterValue(
            f"{what} must be the CA certificate(s) as PEM text (-----BEGIN CERTIFICATE-----...), not "
            f"{shown!r}: a file path cannot be read by the steps that connect to the nodes. "
            "The CLI's --tls-ca-file reads the file and sends its PEM."
        )
    return bundle


def _tls(cache: Mapping[str, Any], secret: Mapping[str, str]) -> Tls | None:
    if not cache.get("TransitEncryptionEnabled"):
        return None
    server_name = cache.get("TlsServerName") or None
    if cache.get("TlsCaBundle"):
        return Tls(ca_pem=check_ca_pem(str(cache["TlsCaBundle"])), server_name=server_name)
    if secret.get("ca"):
        return Tls(ca_pem=check_ca_pem(str(secret["ca"]), "The secret's ca field"), server_name=server_name)
    return Tls(server_name=server_name)  # the system CAs


def for_cache(cache: Mapping[str, Any], *, force: bool = False) -> Credentials:
    """The credentials a registry record points at (no secret read when it names none)."""
    secret: dict[str, str] = {}
    if cache.get("AuthSecretArn"):
        secret = read_secret(str(cache["AuthSecretArn"]), force=force)
    elif cache.get("AuthParameterName"):
        secret = read_parameter(str(cache["AuthParameterName"]), force=force)
    username = secret.get("username") or cache.get("AuthUsername") or None
    return Credentials(username, secret.get("password"), _tls(cache, secret))


def for_cache_name(name: str, catalog: Any = None) -> Credentials:
    """Resolve by cache name (what a state machine step has)."""
    if catalog is None:
        from cachevault.catalog.records import Catalog
        from cachevault.core.settings import Settings

        catalog = Catalog(Settings.from_env())
    return for_cache(catalog.get_cache(name))


def secret_document(username: str | None, password: str) -> str:
    """The JSON a secret created by ``cache create --auth-password`` holds."""
    doc = {"username": username, "password": password} if username else {"password": password}
    return json.dumps(doc)


# --------------------------------------------------------------------------- registry fields
# What a request may say about a (new) cache's security: names and PEM text, never a secret.
SECURITY_FIELDS = (
    "AuthSecretArn",
    "AuthParameterName",
    "AuthUsername",
    "TransitEncryptionEnabled",
    "TlsCaBundle",
    "TlsServerName",
    "TlsCertificateFile",  # local fleet only: the nodes' own certificate and key
    "TlsKeyFile",
)


def security_fields(request: Mapping[str, Any]) -> dict[str, Any]:
    """The security settings of a request, checked, to store on a cache record."""
    fields = {k: request[k] for k in SECURITY_FIELDS if request.get(k) not in (None, "", False)}
    if fields.get("AuthSecretArn") and fields.get("AuthParameterName"):
        raise InvalidParameterValue("Give AuthSecretArn or AuthParameterName, not both.")
    if "Password" in request or "AuthToken" in request:
        # A secret in a request would be kept in the execution history: refuse it.
        raise InvalidParameterValue("Pass credentials by AuthSecretArn or AuthParameterName, never inline.")
    if fields.get("TlsCaBundle"):
        check_ca_pem(str(fields["TlsCaBundle"]))
    return fields


def read_ca_file(path: str | Path) -> str:
    """The PEM text of a CA file on this machine (the CLI's --tls-ca-file), checked."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParameterValue(f"Cannot read the CA file {path}: {exc}") from None
    return check_ca_pem(text, f"CA file {path}")


def fleet_tls(cache: Mapping[str, Any]) -> dict[str, str] | None:
    """TLS settings of the nodes a cache's tasks run, for a cache with transit encryption (None without).

    The nodes' own certificate and key are files of the machine running them; the CA travels
    as PEM text (``ca_pem``, from ``TlsCaBundle``): the step that starts the tasks runs in a
    Lambda whose files no task can read, so it hands the task the text itself.
    """
    if not cache.get("TransitEncryptionEnabled"):
        return None
    files = {"cert_file": cache.get("TlsCertificateFile"), "key_file": cache.get("TlsKeyFile")}
    if not all(files.values()) or not cache.get("TlsCaBundle"):
        raise InvalidParameterValue(
            "A local cache with TransitEncryptionEnabled needs TlsCertificateFile and TlsKeyFile (paths of "
            "PEM files on the machine running the nodes) and TlsCaBundle (PEM text)."
        )
    return {**{k: str(v) for k, v in files.items()}, "ca_pem": check_ca_pem(str(cache["TlsCaBundle"]))}
