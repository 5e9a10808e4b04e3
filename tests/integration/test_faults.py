"""Fault injection end to end: the real state machines, handlers, S3, DynamoDB and redis-server nodes.

Each test breaks one thing while a snapshot or a restore runs through ``ControlPlane``
and asserts the product's contract: the operation either completes with a valid result
or fails cleanly (status ``failed`` with a reason, no object, no multipart upload, the
cache's lock released), and a retry after the fault is gone succeeds.

Faults are injected where they happen in real life: on the redis-server nodes
(REPLICAOF for a failover or a lost master link, SIGKILL), and on the embedded AWS's
service side (moto's S3 backend answering an error or cutting a download short), so the
product's own clients, retries and cleanup are what is under test.

moto limitation found here: moto's DynamoDB does not serialize writes to one item, so two
conditional writes racing from two threads could both succeed (measured: 3-29 % of
8-thread rounds). Real DynamoDB serializes per item; the embedded AWS puts that guarantee
back (``local.lambda_runtime._patch_dynamodb_item_atomicity``, in the server) rather than the product
weakening its conditional writes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cachevault.catalog import caches, storage
from cachevault.catalog.records import Catalog
from cachevault.core.errors import (
    CacheVaultError,
    CaptureFailed,
    InvalidReplicationGroupState,
    SnapshotAlreadyExistsFault,
    SnapshotQuotaExceededFault,
)
from cachevault.core.timeutil import iso, utcnow
from cachevault.nodes import topology
from cachevault_tools import datagen
from cachevault_tools.local import lambda_runtime
from cachevault_tools.local.redis_process import free_port
from moto.s3.exceptions import S3ClientError
from moto.s3.models import S3Backend

from tests.product_fixtures import (
    Product,
    check_rdb,
    connect,
    digest_of_rdb,
    download,
    fill,
    host_port,
    node_addresses,
    node_digest,
    node_id_at,
    nothing_left,
    slow_down_saves,
    sync_replicas,
    wait_until,
)


# ------------------------------------------------------------------------------ helpers
def _unlocked(product: Product, cache: str) -> bool:
    return "LockedBy" not in product.control.catalog.get_cache(cache)


def _assert_failed_cleanly(product: Product, cache: str, snapshot: str, *, reason: str) -> dict[str, Any]:
    with pytest.raises(CaptureFailed, match="failed"):
        product.control.wait_snapshot(snapshot, timeout_s=60)
    record = product.control.describe_snapshot(snapshot)
    assert record["SnapshotStatus"] == "failed"
    assert reason in record["FailureReason"], record["FailureReason"]
    nothing_left(product, snapshot)
    assert _unlocked(product, cache)
    assert product.control.catalog.capture_progress(snapshot) == {}
    return record


def _assert_valid_snapshot(product: Product, snapshot: str, digest: tuple[str, int], tmp_path: Path) -> dict[str, Any]:
    record = product.control.wait_snapshot(snapshot, timeout_s=60)
    assert record["SnapshotStatus"] == "available"
    rdb = download(product, record["NodeSnapshots"][0]["S3Key"], tmp_path / f"{snapshot}.rdb")
    checked = check_rdb(rdb)
    assert checked.returncode == 0 and "RDB looks OK" in checked.stdout, checked.stdout + checked.stderr
    assert digest_of_rdb(rdb, tmp_path / f"{snapshot}-check") == digest
    assert int(record["CacheSize"]) == rdb.stat().st_size
    return record


def _replicaof(address: str, target: str | None) -> None:
    conn = connect(address)
    try:
        if target is None:
            conn.execute_command("REPLICAOF", "NO", "ONE")
        else:
            conn.execute_command("REPLICAOF", *target.split(":"))
    finally:
        conn.close()


def _no_save_running(addresses: list[str]) -> bool:
    for address in addresses:
        conn = connect(address)
        try:
            if int(conn.info("persistence")["rdb_bgsave_in_progress"]):
                return False
        finally:
            conn.close()
    return True


def _streaming(product: Product, snapshot: str, min_bytes: int = 1) -> bool:
    node = (product.control.describe_snapshot(snapshot)["NodeSnapshots"] or [{}])[0]
    return node.get("CaptureStatus") == "running" and int(node.get("BytesCaptured", 0)) >= min_bytes


def _big_cache(product: Product, new_cache: Any, prefix: str, *, replicas: int, mb: int, seed: int) -> dict[str, Any]:
    cache = new_cache(prefix, replicas=replicas)
    primary = cache["Endpoints"][0]
    datagen.generate(*host_port(primary), mb, seed=seed)
    sync_replicas(primary, replicas)
    return cache


# ------------------------------------------------------------------------------ 1: failover
def test_failover_during_capture_fails_cleanly_and_retry_reads_the_new_topology(
    product: Product, new_cache: Any, tmp_path: Path
) -> None:
    """A source replica whose replication ID changes mid-capture cuts the stream.

    The decision: the snapshot fails (as ElastiCache fails a snapshot interrupted by a
    failover), never completes with a half stream; the retry re-reads the topology in
    SelectSources, finds the new primary and captures from one of its replicas.
    """
    cache = _big_cache(product, new_cache, "fo", replicas=2, mb=20, seed=31)
    old_primary = cache["Endpoints"][0]
    digest = node_digest(old_primary)
    source, promoted = node_addresses(cache, "replica")
    slow_down_saves([source], max(1, 6_000_000 // digest[1]))  # a ~6 s save on the source

    product.control.create_snapshot(cache["CacheName"], "fo-snap", source_node=node_id_at(cache, source))
    wait_until(lambda: _streaming(product, "fo-snap"), 30, "the capture to stream")
    # A real failover: promote the other replica, then repoint the old primary and the source.
    _replicaof(promoted, None)
    _replicaof(old_primary, promoted)
    _replicaof(source, promoted)

    record = _assert_failed_cleanly(product, cache["CacheName"], "fo-snap", reason="CaptureFailed: ")
    assert node_id_at(cache, source) in record["FailureReason"]
    assert "mid-stream" in record["FailureReason"] or "connection" in record["FailureReason"]

    slow_down_saves([source], 0)
    wait_until(lambda: _no_save_running([source]), 20, "the cut save on the old source to end")
    sync_replicas(promoted, 2)  # both repointed nodes are linked replicas of the new primary
    topo = topology.discover([host_port(old_primary)])
    assert topo.shards[0].primary.endpoint == promoted
    assert {r.endpoint for r in topo.shards[0].replicas if r.link_up} == {old_primary, source}

    product.control.create_snapshot(cache["CacheName"], "fo-retry")
    retry = _assert_valid_snapshot(product, "fo-retry", digest, tmp_path)
    node = retry["NodeSnapshots"][0]
    assert node["SourceRole"] == "replica"
    assert node["CacheNodeId"] in {node_id_at(cache, old_primary), node_id_at(cache, source)}
    assert _unlocked(product, cache["CacheName"])


# ------------------------------------------------------------------------------ 2: NOMASTERLINK
def _link_down(address: str) -> bool:
    conn = connect(address)
    try:
        return conn.info("replication").get("master_link_status") == "down"
    finally:
        conn.close()


def test_primary_down_is_refused_before_anything_is_written(product: Product, new_cache: Any) -> None:
    cache = new_cache("nml", replicas=2)
    fill(cache["Endpoints"][0], keys=300)
    sync_replicas(cache["Endpoints"][0], 2)
    primary_id = node_id_at(cache, cache["Endpoints"][0])
    product.kill_node(primary_id)
    # Each replica notices on its own schedule (replication cron): wait until both do, then
    # they answer SYNC with -NOMASTERLINK and nothing may be captured from them.
    wait_until(lambda: all(_link_down(a) for a in node_addresses(cache, "replica")), 30, "the replicas' link down")
    with pytest.raises(InvalidReplicationGroupState) as refused:
        product.control.create_snapshot(cache["CacheName"], "nml-snap")
    message = str(refused.value)
    assert "NOMASTERLINK" in message and "primary" in message and "down" in message, message
    assert product.control.catalog.find_snapshot("nml-snap") is None
    nothing_left(product, "nml-snap")
    assert _unlocked(product, cache["CacheName"])


def test_master_link_lost_after_source_selection_fails_with_nomasterlink(
    product: Product, new_cache: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = new_cache("nml2", replicas=1)
    primary = cache["Endpoints"][0]
    fill(primary, keys=500)
    sync_replicas(primary, 1)
    digest = node_digest(primary)
    [replica] = node_addresses(cache, "replica")
    # The handlers run in worker processes: the fault is injected where the embedded AWS
    # hands StartCapture its event, after SelectSources chose a healthy replica.
    real_invoke = lambda_runtime.RUNTIME.invoke
    start_function = product.env.deployed.function_name("CaptureStartFunction")

    def link_breaks_first(config: Any, event: Any) -> Any:
        if config.function_name == start_function and event.get("SnapshotName") == "nml2-snap":
            shard = event["Shard"]
            _replicaof(f"{shard['Host']}:{shard['Port']}", f"127.0.0.1:{free_port()}")
        return real_invoke(config, event)

    monkeypatch.setattr(lambda_runtime.RUNTIME, "invoke", link_breaks_first)
    product.control.create_snapshot(cache["CacheName"], "nml2-snap")
    record = _assert_failed_cleanly(product, cache["CacheName"], "nml2-snap", reason="NOMASTERLINK")
    assert node_id_at(cache, replica) in record["FailureReason"]

    monkeypatch.setattr(lambda_runtime.RUNTIME, "invoke", real_invoke)
    _replicaof(replica, primary)
    sync_replicas(primary, 1)
    product.control.create_snapshot(cache["CacheName"], "nml2-retry")
    _assert_valid_snapshot(product, "nml2-retry", digest, tmp_path)


# ------------------------------------------------------------------------------ 3: S3 faults
class S3Faults:
    """Service-side S3 errors in the embedded AWS, scoped to one key prefix."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.upload_part_errors: dict[str, tuple[str, int]] = {}  # prefix -> (code, how many; -1 = always)
        self.truncate_gets: dict[str, int] = {}  # prefix -> bytes served before the cut
        self.injected: list[str] = []
        self._lock = threading.Lock()
        real_upload_part, real_get_object = S3Backend.upload_part, S3Backend.get_object
        faults = self

        def upload_part(self: S3Backend, bucket_name: str, multipart_id: str, part_id: int, value: bytes) -> Any:
            key = self.get_bucket(bucket_name).multiparts[multipart_id].key_name
            code = faults._take(faults.upload_part_errors, key)
            if code:
                raise S3ClientError(code, f"injected fault on UploadPart {key} part {part_id}")
            return real_upload_part(self, bucket_name, multipart_id, part_id, value)

        def get_object(self: S3Backend, bucket_name: str, key_name: str, *args: Any, **kwargs: Any) -> Any:
            key = real_get_object(self, bucket_name, key_name, *args, **kwargs)
            for prefix, keep in faults.truncate_gets.items():
                if key is not None and key_name.startswith(prefix) and keep < key.size:
                    faults.injected.append(f"GetObject {key_name}")
                    return _CutShort(key, keep)
            return key

        monkeypatch.setattr(S3Backend, "upload_part", upload_part)
        monkeypatch.setattr(S3Backend, "get_object", get_object)

    def _take(self, table: dict[str, tuple[str, int]], key: str) -> str | None:
        with self._lock:
            for prefix, (code, left) in table.items():
                if key.startswith(prefix) and left != 0:
                    table[prefix] = (code, left - 1 if left > 0 else left)
                    self.injected.append(f"{code} {key}")
                    return code
        return None


class _CutShort:
    """An S3 object whose body stops after ``keep`` bytes while its headers promise all of it."""

    def __init__(self, key: Any, keep: int) -> None:
        self._key, self._keep = key, keep

    def __getattr__(self, name: str) -> Any:
        return getattr(self._key, name)

    @property
    def value(self) -> bytes:
        return self._key.value[: self._keep]


@pytest.fixture
def s3_faults(monkeypatch: pytest.MonkeyPatch) -> S3Faults:
    return S3Faults(monkeypatch)


def test_s3_throttling_on_upload_part_aborts_the_multipart_upload(
    product: Product, new_cache: Any, s3_faults: S3Faults, tmp_path: Path
) -> None:
    cache = _big_cache(product, new_cache, "s3f", replicas=1, mb=20, seed=41)  # > one 16 MiB part
    digest = node_digest(cache["Endpoints"][0])
    # S3 throttles every part of this snapshot: botocore's retries run out (standard mode, 5 tries).
    s3_faults.upload_part_errors["snapshots/s3f-snap/"] = ("SlowDown", -1)
    started = time.monotonic()
    product.control.create_snapshot(cache["CacheName"], "s3f-snap")
    record = _assert_failed_cleanly(product, cache["CacheName"], "s3f-snap", reason="CaptureFailed: ")
    assert "SlowDown" in record["FailureReason"] and "UploadPart" in record["FailureReason"]
    assert len([i for i in s3_faults.injected if "s3f-snap" in i]) >= 5  # the client did retry
    print(f"throttled snapshot failed after {time.monotonic() - started:.1f} s")

    # The fault is gone but for one transient throttle: the client's retry absorbs it.
    s3_faults.upload_part_errors["snapshots/s3f-retry/"] = ("SlowDown", 1)
    product.control.create_snapshot(cache["CacheName"], "s3f-retry")
    retry = _assert_valid_snapshot(product, "s3f-retry", digest, tmp_path)
    assert s3_faults.upload_part_errors["snapshots/s3f-retry/"] == ("SlowDown", 0)  # it did hit
    assert int(retry["CacheSize"]) > 16 << 20  # a multipart upload, the path under test
    assert product.multipart_uploads() == []


# ------------------------------------------------------------------------------ 4: concurrency
def _insert_manual(product: Product, cache: str, count: int, node: str) -> None:
    for i in range(count):
        product.control.catalog.create_snapshot(
            {
                "SnapshotName": f"{cache}-old-{i}",
                "ReplicationGroupId": cache,
                "SnapshotStatus": "available",
                "SnapshotSource": "manual",
                "SnapshotCreateTime": iso(utcnow() - timedelta(minutes=i + 5)),
                "NodeSnapshots": [{"NodeGroupId": "0001", "CacheNodeId": node}],
            }
        )


def _burst(product: Product, cache: str, names: list[str]) -> dict[str, BaseException | dict[str, Any]]:
    """Send CreateSnapshot for every name at once (one thread each); name -> record or error."""
    barrier = threading.Barrier(len(names))
    results: dict[int, BaseException | dict[str, Any]] = {}

    def one(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            results[i] = product.control.create_snapshot(cache, names[i])
        except BaseException as exc:  # reported per request below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads)
    return {f"{i}:{names[i]}": results[i] for i in range(len(names))}


class CreatingWatcher:
    """Samples the catalog: how many snapshots of one cache are ``creating`` at once."""

    def __init__(self, catalog: Catalog, cache: str) -> None:
        self.catalog, self.cache = catalog, cache
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(100_000):
            if self._stop.wait(0.02):
                return
            creating = [s for s in self.catalog.all_snapshots(cache=self.cache) if s["SnapshotStatus"] == "creating"]
            self.most = max(self.most, len(creating))

    def __enter__(self) -> CreatingWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def test_concurrent_requests_one_at_a_time_within_quota(product: Product, new_cache: Any) -> None:
    cache = new_cache("conc", replicas=1)
    name = cache["CacheName"]
    fill(cache["Endpoints"][0], keys=500)
    sync_replicas(cache["Endpoints"][0], 1)
    [replica] = node_addresses(cache, "replica")
    replica_id = node_id_at(cache, replica)  # the node every request would read (predicted source)
    _insert_manual(product, name, 18, replica_id)

    accepted: list[str] = []
    outcomes: list[list[str]] = []
    with CreatingWatcher(product.control.catalog, name) as watcher:
        for wave in range(4):  # 2 fit in the quota; each burst lets at least one through until then
            names = [f"conc-w{wave}-{i}" for i in range(3)] + [f"conc-w{wave}-same"] * 2
            codes = []
            for label, result in _burst(product, name, names).items():
                if isinstance(result, dict):
                    assert result["SnapshotStatus"] == "creating"
                    accepted.append(result["SnapshotName"])
                    codes.append("accepted")
                else:
                    assert isinstance(
                        result, (InvalidReplicationGroupState, SnapshotAlreadyExistsFault, SnapshotQuotaExceededFault)
                    ), f"{label}: {result!r}"
                    codes.append(type(result).__name__)
            outcomes.append(sorted(codes))
            for snapshot in accepted:
                product.control.wait_snapshot(snapshot, timeout_s=60)
            if set(codes) == {"SnapshotQuotaExceededFault"}:
                break
    print("\n".join(f"wave {i}: {codes}" for i, codes in enumerate(outcomes)))
    assert watcher.most == 1, f"{watcher.most} snapshots of one cache were creating at once"
    assert len(accepted) == 2 and len(set(accepted)) == 2, outcomes
    assert set(outcomes[-1]) == {"SnapshotQuotaExceededFault"}, outcomes
    records = product.control.catalog.all_snapshots(cache=name)
    ours = sorted(s["SnapshotName"] for s in records if s["SnapshotName"].startswith("conc-w"))
    assert ours == sorted(accepted)  # no lost, no duplicated, no refused request left a record
    assert all(s["SnapshotStatus"] == "available" for s in records)
    assert len([s for s in records if s["SnapshotSource"] == "manual"]) == 20
    assert _unlocked(product, name)
    for snapshot in accepted:
        assert len(product.s3_keys(storage.snapshot_prefix(snapshot))) == 2  # rdb + manifest


@pytest.fixture
def lock_hooks(monkeypatch: pytest.MonkeyPatch) -> dict[str, Callable[[], None]]:
    """owner -> a callable run right before that owner's ``lock_cache`` (to order a race).

    The steps run in Lambda worker processes, so the hook sits where their lock request
    arrives: the embedded DynamoDB, before the item's conditional update is applied (and
    outside the per-item lock of ``local.lambda_runtime``, so the hook may call DynamoDB).
    """
    from moto.dynamodb.models import DynamoDBBackend

    hooks: dict[str, Callable[[], None]] = {}
    real = DynamoDBBackend.update_item

    def update_item(self: Any, table_name: str, key: Any, update_expression: str, *args: Any, **kwargs: Any) -> Any:
        values = args[1] if len(args) > 1 else kwargs.get("expression_attribute_values") or {}
        if update_expression.startswith("SET LockedBy = :o"):
            hook = hooks.get((values.get(":o") or {}).get("S", ""))
            if hook:
                hook()
        return real(self, table_name, key, update_expression, *args, **kwargs)

    monkeypatch.setattr(DynamoDBBackend, "update_item", update_item)
    return hooks


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as exc:  # the test inspects it
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_quota_is_rechecked_under_the_lock(
    product: Product, new_cache: Any, lock_hooks: dict[str, Callable[[], None]], tmp_path: Path
) -> None:
    """A request that passed the quota check must count a snapshot that completed before it got the lock.

    The interleaving is made deterministic: right before this request takes the lock,
    another snapshot of the same node completes (its record appears, its lock is gone).
    """
    cache = new_cache("qlate", replicas=1)
    name = cache["CacheName"]
    fill(cache["Endpoints"][0], keys=300)
    sync_replicas(cache["Endpoints"][0], 1)
    digest = node_digest(cache["Endpoints"][0])
    replica_id = node_id_at(cache, node_addresses(cache, "replica")[0])
    _insert_manual(product, name, 19, replica_id)
    lock_hooks["qlate-late"] = lambda: product.control.catalog.create_snapshot(
        {
            "SnapshotName": "qlate-meanwhile",
            "ReplicationGroupId": name,
            "SnapshotStatus": "available",
            "SnapshotSource": "manual",
            "SnapshotCreateTime": iso(),
            "NodeSnapshots": [{"NodeGroupId": "0001", "CacheNodeId": replica_id}],
        }
    )

    with pytest.raises(SnapshotQuotaExceededFault, match="20 manual snapshots"):
        product.control.create_snapshot(name, "qlate-late")  # its rules passed with 19 < 20
    assert product.control.catalog.find_snapshot("qlate-meanwhile") is not None  # the hook ran
    assert product.control.catalog.find_snapshot("qlate-late") is None
    nothing_left(product, "qlate-late")
    assert _unlocked(product, name)

    # One old snapshot leaves the window: exactly one more fits, and runs for real.
    product.control.catalog.delete_snapshot_record(f"{name}-old-0")
    product.control.create_snapshot(name, "qlate-fits")
    _assert_valid_snapshot(product, "qlate-fits", digest, tmp_path)


def test_duplicate_name_racing_in_does_not_release_the_running_snapshots_lock(
    product: Product, new_cache: Any, lock_hooks: dict[str, Callable[[], None]], tmp_path: Path
) -> None:
    cache = _big_cache(product, new_cache, "dupl", replicas=1, mb=4, seed=43)
    name = cache["CacheName"]
    digest = node_digest(cache["Endpoints"][0])
    slow_down_saves(node_addresses(cache, "replica"), max(1, 3_000_000 // digest[1]))  # ~3 s capture
    record_made = threading.Event()
    twin_waiting = threading.Event()
    calls: list[int] = []

    def twin_passed_its_checks_first() -> None:
        # The first lock attempt is the twin's: it passed "name is free" before the other
        # request created its record, and reaches the lock only after that.
        calls.append(1)
        if len(calls) == 1:
            twin_waiting.set()
            assert record_made.wait(60)

    lock_hooks["dupl-snap"] = twin_passed_its_checks_first
    thread, out = _in_thread(lambda: product.control.create_snapshot(name, "dupl-snap"))
    assert twin_waiting.wait(30)
    first = product.control.create_snapshot(name, "dupl-snap")
    assert first["SnapshotStatus"] == "creating"
    record_made.set()
    thread.join(timeout=60)
    assert not thread.is_alive()
    [twin] = out
    assert isinstance(twin, (SnapshotAlreadyExistsFault, InvalidReplicationGroupState)), twin
    # The running snapshot still holds its cache: a third request is turned away.
    assert product.control.describe_snapshot("dupl-snap")["SnapshotStatus"] == "creating"
    assert product.control.catalog.get_cache(name).get("LockedBy") == "dupl-snap"
    with pytest.raises(InvalidReplicationGroupState, match="busy"):
        product.control.create_snapshot(name, "dupl-third")
    assert product.control.catalog.find_snapshot("dupl-third") is None

    _assert_valid_snapshot(product, "dupl-snap", digest, tmp_path)
    # The record is the first request's, untouched by its twin.
    assert product.control.describe_snapshot("dupl-snap")["ExecutionName"] == first["ExecutionName"]
    assert _unlocked(product, name)


# ------------------------------------------------------------------------------ 5: restore staging
def test_interrupted_staging_download_fails_the_restore_before_any_write(
    product: Product, new_cache: Any, s3_faults: S3Faults
) -> None:
    cache = new_cache("rsf", replicas=0)
    primary = cache["Endpoints"][0]
    fill(primary, keys=1500)
    digest = node_digest(primary)
    product.control.create_snapshot(cache["CacheName"], "rsf-snap")
    snapshot = product.control.wait_snapshot("rsf-snap", timeout_s=60)
    size = int(snapshot["CacheSize"])
    objects = product.s3_keys("snapshots/rsf-snap/")
    staging = product.settings.state_dir / "restore-staging" / "rsf-target"

    # The connection drops halfway through the staging download of the RDB (headers promise it all).
    s3_faults.truncate_gets["snapshots/rsf-snap/rsf-snap-0001.rdb"] = size // 2
    try:
        arn, target = product.control.restore("rsf-target", snapshot="rsf-snap", replicas=0)
        with pytest.raises(CacheVaultError) as failure:
            product.control.wait_restore(arn, target, timeout_s=60)
        assert set(s3_faults.injected) == {"GetObject snapshots/rsf-snap/rsf-snap-0001.rdb"}
        message = str(failure.value)
        print(f"interrupted staging: {message}")
        # Over HTTP botocore's response checksum catches the cut first (as on AWS); without
        # one the product's own size check does (read vs expected bytes).
        cut_seen = "did not match calculated checksum" in message
        assert cut_seen or (f"{size // 2}" in message and f"{size}" in message), message
        failed = product.control.catalog.get_cache(target)
        assert failed["Status"] == "failed" and failed["FailureReason"]
        assert failed["Nodes"] == [] and failed["Endpoints"] == []
        assert product.node_pids(target) == []  # no node was ever started: nothing written anywhere
        assert not staging.exists()
        assert product.control.describe_snapshot("rsf-snap")["SnapshotStatus"] == "available"
        assert product.s3_keys("snapshots/rsf-snap/") == objects

        del s3_faults.truncate_gets["snapshots/rsf-snap/rsf-snap-0001.rdb"]
        arn, target = product.control.restore("rsf-target", snapshot="rsf-snap", replicas=0)
        output = product.control.wait_restore(arn, target, timeout_s=60)
        assert output["Status"] == "available"
        restored = product.control.catalog.get_cache(target)
        assert node_digest(restored["Endpoints"][0]) == digest
        assert product.control.describe_snapshot("rsf-snap")["SnapshotStatus"] == "available"
    finally:
        if product.control.catalog.find_cache("rsf-target") is not None:
            caches.delete_local_cache("rsf-target", product.settings)


def test_a_preflight_still_queued_is_reported_not_failed(
    product: Product, new_cache: Any, lock_hooks: dict[str, Callable[[], None]]
) -> None:
    """The caller stops waiting for acceptance; the execution goes on and ends on its own."""
    cache = new_cache("queued", replicas=1)
    fill(cache["Endpoints"][0], keys=50)
    held = threading.Event()

    def hold() -> None:  # the preflight stuck behind something slow, before it writes the record
        held.wait(60)

    lock_hooks["queued-snap"] = hold
    try:
        started = product.control.create_snapshot(cache["CacheName"], "queued-snap", accept_timeout_s=0.5)
        assert started["Accepted"] is False and started["SnapshotStatus"] == "creating"
        assert product.control.catalog.find_snapshot("queued-snap") is None  # nothing claimed yet
    finally:
        held.set()
    record = product.control.wait_snapshot("queued-snap", execution_arn=started["ExecutionArn"])
    assert record["SnapshotStatus"] == "available"
