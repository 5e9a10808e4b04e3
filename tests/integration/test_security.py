"""Security defaults end to end: AUTH/ACL users, credentials from Secrets Manager / SSM that
never leak, a least-privilege backup user, TLS-only nodes, SSE on every object, input
validation. Real redis-server nodes, the real state machines, embedded AWS (moto).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from pathlib import Path
from typing import Any

import pytest
import redis
from cachevault.catalog import caches, storage
from cachevault.catalog.records import Catalog
from cachevault.core import encryption, names
from cachevault.core.aws import client
from cachevault.core.errors import CaptureFailed, InvalidParameterValue, InvalidReplicationGroupState
from cachevault.core.handler import logger
from cachevault.nodes import credentials
from cachevault.nodes.credentials import Credentials, Tls
from cachevault.nodes.slots import key_slot
from cachevault.ops.control_plane import RESTORE_SNAPSHOT
from cachevault.snapshot import capture_runner
from cachevault.snapshot.capture import capture_rdb
from cachevault_tools.local.deployer import deploy
from cachevault_tools.local.environment import find_template

from tests.product_fixtures import Product, wait_until
from tests.tls_fixtures import TlsFiles, make_tls_files

# What the product's backup user needs on every node (measured below with INFO commandstats).
BACKUP_ACL = ["-@all", "+replconf", "+sync", "+psync", "+ping", "+info", "+cluster|shards", "+cluster|nodes"]
CAPTURE_ONLY_ACL = ["-@all", "+replconf", "+sync", "+psync", "+ping"]


def _client(address: str, creds: Credentials) -> redis.Redis:
    host, _, port = address.rpartition(":")
    return redis.Redis(host=host, port=int(port), socket_timeout=30, **creds.redis_kwargs())


def _fill(address: str, creds: Credentials, keys: int = 500) -> None:
    conn = _client(address, creds)
    try:
        pipe = conn.pipeline(transaction=False)
        for i in range(keys):
            pipe.set(f"k:{i}", secrets.token_bytes(32))
            if i % 4 == 0:
                pipe.hset(f"h:{i}", mapping={"a": i, "b": secrets.token_hex(4)})
        pipe.execute()
        assert conn.execute_command("WAIT", 1, 10000) >= 1  # replicas caught up
    finally:
        conn.close()


def _digest(address: str, creds: Credentials) -> tuple[str, int]:
    conn = _client(address, creds)
    try:
        return conn.execute_command("DEBUG", "DIGEST"), conn.dbsize()
    finally:
        conn.close()


def _restore(product: Product, target: str, snapshot: str, **security: Any) -> dict[str, Any]:
    """Through the control plane, as the CLI and API do: security goes by reference only."""
    arn, target = product.control.restore(target, snapshot=snapshot, security=security)
    product.control.wait_restore(arn, target, timeout_s=90)
    return product.control.catalog.get_cache(target)


class _Capture(logging.Handler):
    """Log lines of this process's steps plus what the Lambda workers printed (forwarded to stdout)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        super().__init__(logging.DEBUG)
        self._capsys = capsys
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self._lines.append(self.format(record))

    @property
    def lines(self) -> list[str]:
        self._lines.extend(self._capsys.readouterr().out.splitlines())
        return self._lines


@pytest.fixture
def captured_logs(product: Product, capsys: pytest.CaptureFixture[str]) -> Any:
    handler = _Capture(capsys)
    handler.setFormatter(logger.registered_formatter)
    inner = logger._logger
    level = inner.level
    inner.addHandler(handler)
    inner.setLevel(logging.DEBUG)  # step inputs are logged at DEBUG: they must be clean too
    # The steps run in Lambda workers: they log at DEBUG when their LOG_LEVEL says so.
    lam = client("lambda")
    originals: dict[str, dict[str, str]] = {}
    for function in product.env.deployed.functions.values():
        env = lam.get_function_configuration(FunctionName=function.name)["Environment"]["Variables"]
        originals[function.name] = env
        lam.update_function_configuration(
            FunctionName=function.name, Environment={"Variables": {**env, "LOG_LEVEL": "DEBUG"}}
        )
    try:
        yield handler
    finally:
        for name, env in originals.items():
            lam.update_function_configuration(FunctionName=name, Environment={"Variables": env})
        inner.removeHandler(handler)
        inner.setLevel(level)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def _everything_recorded(product: Product, snapshot: str) -> str:
    """Execution histories, catalog tables and the manifest, as one text."""
    sfn = client("stepfunctions")
    texts: list[str] = []
    for arn in product.env.info.state_machines.values():
        for execution in sfn.list_executions(stateMachineArn=arn)["executions"]:
            history = sfn.get_execution_history(executionArn=execution["executionArn"], maxResults=1000)
            texts.append(json.dumps(history["events"], default=str))
    dynamodb = client("dynamodb")
    for table in dynamodb.list_tables()["TableNames"]:
        texts.append(json.dumps(dynamodb.scan(TableName=table)["Items"], default=str))
    texts.append(json.dumps(storage.read_manifest(product.s3, product.bucket, snapshot)))
    return "\n".join(texts)


# ------------------------------------------------------------------------------ AUTH
def test_auth_cache_snapshot_and_restore_never_show_the_password(product: Product, captured_logs: _Capture) -> None:
    password = "pw-" + secrets.token_hex(12)
    cache = caches.create_local_cache(
        "sec-auth", auth_password=password, auth_username="admin", settings=product.settings
    )
    try:
        assert cache["AuthSecretArn"].split(":secret:")[1].startswith("cachevault/sec-auth/auth")
        assert password not in json.dumps(cache, default=str)
        creds = credentials.for_cache(cache)
        assert (creds.username, creds.password) == ("admin", password)
        assert password not in repr(creds) and "***" in repr(creds)
        primary = cache["Endpoints"][0]
        with pytest.raises(redis.AuthenticationError):  # the nodes really require AUTH
            _client(primary, credentials.NONE).ping()
        _fill(primary, creds)

        product.control.create_snapshot("sec-auth", "sec-auth-snap")
        record = product.control.wait_snapshot("sec-auth-snap", timeout_s=60)
        assert record["SnapshotStatus"] == "available"
        assert record["NodeSnapshots"][0]["SourceRole"] == "replica"

        restored = _restore(product, "sec-auth-copy", "sec-auth-snap", AuthSecretArn=cache["AuthSecretArn"])
        assert restored["Status"] == "available" and restored["AuthSecretArn"] == cache["AuthSecretArn"]
        target = restored["Endpoints"][0]
        with pytest.raises(redis.AuthenticationError):  # the restored cache is protected too
            _client(target, credentials.NONE).ping()
        assert _digest(target, creds) == _digest(primary, creds)

        logs = "\n".join(captured_logs.lines)
        assert "sec-auth-snap" in logs  # the steps did log (at DEBUG, with their inputs)
        assert password not in logs
        recorded = _everything_recorded(product, "sec-auth-snap")
        assert cache["AuthSecretArn"] in recorded  # the reference is there, the value is not
        assert password not in recorded
    finally:
        for name in ("sec-auth-copy", "sec-auth"):
            if product.control.catalog.find_cache(name):
                caches.delete_local_cache(name, product.settings)
    # The secret cachevault made for the cache goes with it.
    listed = client("secretsmanager").list_secrets()["SecretList"]
    assert not [s for s in listed if s["Name"] == "cachevault/sec-auth/auth"]


def test_least_privilege_backup_user_from_ssm(product: Product) -> None:
    admin = "adm-" + secrets.token_hex(8)
    cache = caches.create_local_cache("sec-acl", auth_password=admin, settings=product.settings)
    backup_pw = "bk-" + secrets.token_hex(8)
    try:
        addresses = [n["Address"] for n in cache["Nodes"]]
        admin_creds = Credentials(None, admin)
        _fill(cache["Endpoints"][0], admin_creds)
        for address in addresses:  # ACL users are per node
            conn = _client(address, admin_creds)
            try:
                conn.execute_command("ACL", "SETUSER", "backup", "reset", "on", f">{backup_pw}", *BACKUP_ACL)
                conn.execute_command("CONFIG", "RESETSTAT")
            finally:
                conn.close()
        client("ssm").put_parameter(
            Name="/cachevault/sec-acl/backup",
            Type="SecureString",
            Value=json.dumps({"username": "backup", "password": backup_pw}),
        )
        external = caches.register_external_cache(
            "sec-acl-ext",
            [cache["Endpoints"][0]],
            auth_parameter_name="/cachevault/sec-acl/backup",
            settings=product.settings,
        )
        assert external["Managed"] == "external" and external["NumNodeGroups"] == 1
        product.control.create_snapshot("sec-acl-ext", "sec-acl-snap")
        record = product.control.wait_snapshot("sec-acl-snap", timeout_s=60)
        assert record["SnapshotStatus"] == "available"

        # What the backup user really ran, per node (commandstats was reset just before).
        used: dict[str, set[str]] = {}
        for address in addresses:
            conn = _client(address, admin_creds)
            try:
                stats = conn.info("commandstats")
            finally:
                conn.close()
            used[address] = {name.removeprefix("cmdstat_") for name, s in stats.items() if s["calls"] > 0}
        source = record["NodeSnapshots"][0]["CacheNodeId"]  # an external node's id is its address
        assert source in addresses
        allowed = {"auth", "hello", "replconf", "psync", "sync", "ping", "info", "cluster|shards", "cluster|nodes"}
        # Not the backup user's: our CONFIG RESETSTAT, and the replicas' own REPLCONF ACKs
        # on the primary. HELLO/AUTH need no permission. Measured on the source replica:
        # auth, hello, info, replconf, psync; on the primary: hello, info.
        assert used[source] >= {"replconf", "psync", "info"}
        assert all(u - {"config|resetstat"} <= allowed for u in used.values()), used
        assert not any("psync" in u or "sync" in u for a, u in used.items() if a != source)  # no primary fork

        # The capture alone needs even less: no INFO, no CLUSTER.
        conn = _client(source, admin_creds)
        try:
            conn.execute_command("ACL", "SETUSER", "capture", "reset", "on", f">{backup_pw}", *CAPTURE_ONLY_ACL)
        finally:
            conn.close()
        host, _, port = source.rpartition(":")
        sink = bytearray()
        result = capture_rdb(host, int(port), sink.extend, credentials=Credentials("capture", backup_pw))
        assert result.size == len(sink) > 0 and result.crc64_verified
        with pytest.raises(InvalidReplicationGroupState, match=r"NOPERM|permission"):
            # ... but discovery with that user is refused: INFO is what it lacks.
            from cachevault.nodes import topology

            topology.discover([(host, int(port))], credentials=Credentials("capture", backup_pw))
    finally:
        product.control.catalog.delete_cache("sec-acl-ext")  # external: nothing stopped
        caches.delete_local_cache("sec-acl", product.settings)


# ------------------------------------------------------------------------------ TLS
def test_tls_only_cache_snapshot_restore_and_wrong_ca(product: Product, tls_files: TlsFiles) -> None:
    password = "tls-" + secrets.token_hex(8)
    cache = caches.create_local_cache(
        # Nodes are tasks with addresses known only at run time: the certificate names them.
        "sec-tls", tls={**tls_files.fleet(), "server_name": "localhost"}, auth_password=password,
        settings=product.settings,
    )
    try:
        assert cache["TransitEncryptionEnabled"] is True
        creds = credentials.for_cache(cache)
        # The record holds the CA's PEM text, not the path it was read from.
        ca_pem = Path(tls_files.ca_file).read_text()
        assert cache["TlsCaBundle"] == ca_pem
        assert creds.tls is not None and creds.tls.ca_pem == ca_pem and creds.tls.ca_file is None
        primary = cache["Endpoints"][0]
        with pytest.raises(redis.ConnectionError):  # no plaintext listener: port 0
            _client(primary, Credentials(None, password)).ping()
        _fill(primary, creds)

        product.control.create_snapshot("sec-tls", "sec-tls-snap")
        record = product.control.wait_snapshot("sec-tls-snap", timeout_s=60)
        assert record["SnapshotStatus"] == "available"

        restored = _restore(
            product,
            "sec-tls-copy",
            "sec-tls-snap",
            AuthSecretArn=cache["AuthSecretArn"],
            TransitEncryptionEnabled=True,
            TlsCaBundle=ca_pem,
            TlsServerName="localhost",
            TlsCertificateFile=tls_files.cert_file,
            TlsKeyFile=tls_files.key_file,
        )
        target = restored["Endpoints"][0]
        assert _digest(target, creds) == _digest(primary, creds)
        with pytest.raises(redis.ConnectionError):
            _client(target, Credentials(None, password)).ping()

        # A CA that did not sign the nodes' certificate is refused, clearly.
        with pytest.raises(InvalidReplicationGroupState, match="certificate verify failed"):
            caches.register_external_cache(
                "sec-tls-bad",
                [primary],
                auth_secret_arn=cache["AuthSecretArn"],
                tls_ca_bundle=Path(tls_files.other_ca_file).read_text(),
                settings=product.settings,
            )
        assert product.control.catalog.find_cache("sec-tls-bad") is None
        host, _, port = primary.rpartition(":")
        wrong = Credentials(None, password, Tls(ca_file=tls_files.other_ca_file))
        with pytest.raises(CaptureFailed, match=re.escape(f"TLS certificate of {host} refused")):
            capture_rdb(host, int(port), bytearray().extend, credentials=wrong)
    finally:
        for name in ("sec-tls-copy", "sec-tls"):
            if product.control.catalog.find_cache(name):
                caches.delete_local_cache(name, product.settings)


# ------------------------------------------------------------------------------ encryption at rest
def test_objects_sse_s3_by_default_and_sse_kms_with_the_parameter(
    product: Product, new_cache: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = new_cache("sec-sse", replicas=1)
    _fill(cache["Endpoints"][0], credentials.NONE, keys=200)
    product.control.create_snapshot(cache["CacheName"], "sec-sse-snap")
    assert product.control.wait_snapshot("sec-sse-snap", timeout_s=60)["SnapshotStatus"] == "available"
    keys = product.s3_keys(storage.snapshot_prefix("sec-sse-snap"))
    assert len(keys) == 2  # the shard RDB and the manifest
    for key in keys:
        assert product.s3.head_object(Bucket=product.bucket, Key=key)["ServerSideEncryption"] == "AES256"

    # The template deployed with SnapshotEncryption=SSE-KMS hands its functions the key.
    key_id = client("kms").create_key(Description="cachevault snapshots")["KeyMetadata"]["KeyId"]
    deployed = deploy(
        find_template(),
        stack_name="cvkms",
        parameter_overrides={"SnapshotEncryption": "SSE-KMS", "KmsKeyId": key_id, "LogLevel": "WARNING"},
    )
    function = deployed.function_name("CaptureStartFunction")
    env = client("lambda").get_function_configuration(FunctionName=function)["Environment"]["Variables"]
    assert env["SNAPSHOT_ENCRYPTION"] == "SSE-KMS" and env["SNAPSHOT_KMS_KEY_ID"] == key_id
    monkeypatch.setenv("SNAPSHOT_ENCRYPTION", env["SNAPSHOT_ENCRYPTION"])
    monkeypatch.setenv("SNAPSHOT_KMS_KEY_ID", env["SNAPSHOT_KMS_KEY_ID"])

    # A real inline capture with that environment (as StartCapture runs it); an ECS capture
    # worker gets the same variables from its task definition.
    catalog = Catalog(product.settings)
    replica = next(n for n in cache["Nodes"] if n["Role"] == "replica")["Address"]
    host, _, port = replica.rpartition(":")
    shard = {
        "ShardIndex": 1, "NodeGroupId": "0001", "Host": host, "Port": int(port),
        "ReplicationGroupId": cache["CacheName"],
    }  # fmt: skip
    capture_runner.run_inline("sec-kms-snap", shard, product.settings)
    assert catalog.capture_progress("sec-kms-snap")["0001"]["CaptureStatus"] == "done"
    storage.write_manifest(product.s3, product.bucket, "sec-kms-snap", {"x": 1}, extra_args=encryption.s3_args())
    try:
        for key in (storage.rdb_key("sec-kms-snap", 1), storage.manifest_key("sec-kms-snap")):
            head = product.s3.head_object(Bucket=product.bucket, Key=key)
            assert head["ServerSideEncryption"] == "aws:kms"
            assert key_id in head["SSEKMSKeyId"]
    finally:
        storage.delete_prefix(product.s3, product.bucket, storage.snapshot_prefix("sec-kms-snap"))
        catalog.delete_capture_progress("sec-kms-snap")


# ------------------------------------------------------------------------------ input validation
@pytest.mark.parametrize("bad", ["../etc", "a/b", "%2e%2e", "snap..x", "-x", "x-", "a--b", "", "x" * 256])
def test_snapshot_names_follow_elasticache_rules(bad: str) -> None:
    with pytest.raises(InvalidParameterValue):
        names.snapshot_name(bad)


@pytest.mark.parametrize(
    "key",
    [
        "snapshots/../caches.json",
        "../x.rdb",
        "/etc/passwd",
        "snapshots/./x",
        "snapshots/%2e%2e/other/x.rdb",
        "imports/%2E%2E/%2e%2e/x.rdb",
        "snapshots\\..\\x",
        "",
    ],
)
def test_s3_keys_cannot_escape_their_prefix(key: str) -> None:
    with pytest.raises(InvalidParameterValue):
        storage.check_key(key)


def test_requests_refuse_bad_names_and_inline_secrets(product: Product) -> None:
    with pytest.raises(InvalidParameterValue):
        product.control.create_snapshot("../x", "ok-name")
    with pytest.raises(InvalidParameterValue):
        caches.create_local_cache("Bad_Name", settings=product.settings)
    with pytest.raises(InvalidParameterValue, match="never inline"):
        credentials.security_fields({"ReplicationGroupId": "x", "AuthToken": "hunter2"})
    restore = product.control.start(
        RESTORE_SNAPSHOT,
        "restore-bad-s3",
        {"ReplicationGroupId": "sec-bad-s3", "SnapshotArns": ["s3://b/%2e%2e/x.rdb"]},
    )
    done = wait_until(
        lambda: (d := product.control.describe_execution(restore))["status"] != "RUNNING" and d,
        30,
        "the restore to fail",
    )
    assert done["status"] == "SUCCEEDED" or done["status"] == "FAILED"
    cache = product.control.catalog.find_cache("sec-bad-s3")
    assert cache is None or cache["Status"] == "failed"
    assert "escapes its prefix" in json.dumps(done, default=str) + json.dumps(cache or {}, default=str)


def test_unreadable_secret_is_a_clear_error(product: Product) -> None:
    with pytest.raises(InvalidParameterValue, match="Cannot read the cache's credentials"):
        credentials.for_cache({"AuthSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:cachevault/none"})
    client("secretsmanager").create_secret(Name="cachevault/sec-badjson", SecretString='{"user": "x"}')
    arn = client("secretsmanager").describe_secret(SecretId="cachevault/sec-badjson")["ARN"]
    with pytest.raises(InvalidParameterValue, match='non-empty "password"') as info:
        credentials.for_cache({"AuthSecretArn": arn})
    assert '"x"' not in str(info.value)
    assert Path(__file__).exists()


def test_tls_cluster_with_an_acl_user_restores_seeded(product: Product, tls_files: TlsFiles) -> None:
    """A cluster's seeds AUTH as the cache's ACL user on their node's unix socket, which speaks no
    TLS (restore.seed_cluster); the restored cluster talks TLS only, and holds the same data."""
    password = "tlsc-" + secrets.token_hex(8)
    cache = caches.create_local_cache(
        "sec-tlsc", cluster_mode=True, num_shards=2, replicas=0, auth_password=password, auth_username="admin",
        tls={**tls_files.fleet(), "server_name": "localhost"}, settings=product.settings,
    )  # fmt: skip
    try:
        creds = credentials.for_cache(cache)
        for primary in cache["Endpoints"]:
            conn = _client(primary, creds)
            try:
                mine = _slots_of(conn)
                for i in range(300):
                    if key_slot(f"k{i}") in mine:
                        conn.set(f"k{i}", f"v{i}" * 10)
            finally:
                conn.close()
        source = {p: _digest(p, creds) for p in cache["Endpoints"]}
        product.control.create_snapshot("sec-tlsc", "sec-tlsc-snap")
        assert product.control.wait_snapshot("sec-tlsc-snap", timeout_s=60)["SnapshotStatus"] == "available"

        ca_pem = Path(tls_files.ca_file).read_text()
        security = {"AuthSecretArn": cache["AuthSecretArn"], "TransitEncryptionEnabled": True,
                    "TlsCaBundle": ca_pem, "TlsServerName": "localhost",
                    "TlsCertificateFile": tls_files.cert_file, "TlsKeyFile": tls_files.key_file}  # fmt: skip
        arn, target = product.control.restore("sec-tlsc-copy", snapshot="sec-tlsc-snap", replicas=0, security=security)
        output = product.control.wait_restore(arn, target, timeout_s=90)
        assert output["Seeded"] is True and output["ClusterMode"] is True
        restored = product.control.catalog.get_cache(target)["Endpoints"]
        assert sorted(_digest(p, creds) for p in restored) == sorted(source.values())  # shard for shard
        assert all(keys for _, keys in source.values())
        with pytest.raises(redis.ConnectionError):  # no plaintext listener on the restored nodes
            _client(restored[0], Credentials("admin", password)).ping()
        # 2 -> 4 would be cut once by LoadShard and streamed to the seeds over plain TCP
        # (restore.cutter): a cache with transit encryption loads through RESTORE over TLS instead.
        arn, wide = product.control.restore("sec-tlsc-wide", snapshot="sec-tlsc-snap", replicas=0, num_shards=4,
                                            security=security)  # fmt: skip
        output = product.control.wait_restore(arn, wide, timeout_s=90)
        assert output["Seeded"] is False and output["LoadSummary"]["BytesSent"] > 0
        widened = product.control.catalog.get_cache(wide)["Endpoints"]
        assert len(widened) == 4
        assert sum(_digest(p, creds)[1] for p in widened) == sum(keys for _, keys in source.values())
    finally:
        for name in ("sec-tlsc-wide", "sec-tlsc-copy", "sec-tlsc"):
            if product.control.catalog.find_cache(name):
                caches.delete_local_cache(name, product.settings)


def _slots_of(conn: redis.Redis) -> set[int]:
    nodes = conn.execute_command("CLUSTER", "NODES")
    nodes = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
    myself = next(line for line in nodes.splitlines() if "myself" in line)
    owned: set[int] = set()
    for part in myself.split()[8:]:
        lo, _, hi = part.partition("-")
        owned.update(range(int(lo), int(hi or lo) + 1))
    return owned
