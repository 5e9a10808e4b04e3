"""RestoreSnapshot refusals, end to end through the real state machine.

Each refused restore must raise the ElastiCache error a user of RestoreFromSnapshot
would get, and leave nothing half-made registered as healthy: the target's record is
absent (refused before the name was reserved) or ``failed``, none of its redis-server
processes runs, and the snapshot it read is ``available`` again with its S3 objects as
they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cachevault.catalog import caches, storage
from cachevault.core.aws import client
from cachevault.core.errors import (
    CacheVaultError,
    ChecksumMismatch,
    InvalidParameterCombination,
    InvalidParameterValue,
    InvalidSnapshotState,
    ReplicationGroupAlreadyExistsFault,
)
from cachevault.ops.control_plane import RESTORE_SNAPSHOT, execution_name
from cachevault.rdb.dump_payload import crc64

from tests.product_fixtures import Product, connect, delete_caches, fill, fill_cluster, sync_replicas

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rdb"


# ------------------------------------------------------------------------------ helpers
def _snapshot(product: Product, cache: dict[str, Any], name: str) -> dict[str, Any]:
    if cache["ReplicasPerNodeGroup"]:
        for primary in cache["Endpoints"]:
            sync_replicas(primary, cache["ReplicasPerNodeGroup"])
    product.control.create_snapshot(cache["CacheName"], name)
    record = product.control.wait_snapshot(name, timeout_s=60)
    assert record["SnapshotStatus"] == "available"
    return record


def _restore(product: Product, target: str, **kwargs: Any) -> dict[str, Any]:
    arn, name = product.control.restore(target, **kwargs)
    return product.control.wait_restore(arn, name, timeout_s=90)


def _refused(product: Product, target: str, error: type[CacheVaultError], **kwargs: Any) -> CacheVaultError:
    with pytest.raises(error) as refused:
        _restore(product, target, **kwargs)
    return refused.value


def _s3_objects(product: Product, snapshot: str) -> dict[str, tuple[str, int]]:
    listing = client("s3").list_objects_v2(Bucket=product.bucket, Prefix=storage.snapshot_prefix(snapshot))
    return {o["Key"]: (o["ETag"], int(o["Size"])) for o in listing.get("Contents", [])}


def _nothing_healthy_left(product: Product, target: str) -> dict[str, Any] | None:
    """The target is unregistered or failed, and no node of it runs or is on disk."""
    record = product.control.catalog.find_cache(target)
    if record is not None:
        assert record["Status"] == "failed", record
        assert record["FailureReason"]
        assert not record.get("Nodes") and not record.get("Endpoints")
    assert product.running_tasks(target) == []
    assert not (product.settings.state_dir / "restore-staging" / target).exists()
    return record


@pytest.fixture
def targets(product: Product) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    delete_caches(product, made)


@pytest.fixture(scope="module")
def multi_db_snapshot(product: Product) -> Iterator[str]:
    """A cluster-mode-disabled snapshot with keys in db 0 and db 3 (tests may corrupt its objects).

    The source cache is deleted once the snapshot is taken: a restore needs only the snapshot.
    """
    cache = caches.create_local_cache("pf-mdb", replicas=0, settings=product.settings)
    primary = cache["Endpoints"][0]
    fill(primary, keys=300)
    db3 = connect(primary, db=3)
    try:
        db3.set("in-db-3", "x")
        db3.hset("h-db-3", mapping={"a": 1})
    finally:
        db3.close()
    _snapshot(product, cache, "pf-mdb-snap")
    caches.delete_local_cache("pf-mdb", product.settings)
    yield "pf-mdb-snap"


# ------------------------------------------------------------------------------ snapshot state
@pytest.mark.parametrize("status", ["creating", "failed"])
def test_snapshot_not_available(product: Product, targets: list[str], status: str) -> None:
    name = f"pf-{status}-snap"
    product.control.catalog.create_snapshot(
        {"SnapshotName": name, "SnapshotStatus": status, "ReplicationGroupId": "gone", "SnapshotSource": "manual"}
    )
    try:
        targets.append("pf-state")
        err = _refused(product, "pf-state", InvalidSnapshotState, snapshot=name)
        assert err.code == "InvalidSnapshotStateFault"
        assert repr(status) in str(err)
        assert _nothing_healthy_left(product, "pf-state") is None  # refused before reserving the name
        assert product.control.catalog.get_snapshot(name)["SnapshotStatus"] == status  # untouched
    finally:
        product.control.catalog.delete_snapshot_record(name)


def test_target_name_taken(product: Product, new_cache: Any, multi_db_snapshot: str) -> None:
    existing = new_cache("pf-taken", replicas=0)
    primary = existing["Endpoints"][0]
    fill(primary, keys=50, seed=9)
    conn = connect(primary)
    before = conn.execute_command("DEBUG", "DIGEST")
    conn.close()
    objects = _s3_objects(product, multi_db_snapshot)

    err = _refused(product, existing["CacheName"], ReplicationGroupAlreadyExistsFault, snapshot=multi_db_snapshot)
    assert existing["CacheName"] in str(err)
    # The cache that owns the name is left exactly as it was.
    record = product.control.catalog.get_cache(existing["CacheName"])
    assert record["Status"] == "available" and record["Endpoints"] == existing["Endpoints"]
    assert len(product.running_tasks(existing["CacheName"])) == 1  # its one node
    conn = connect(primary)
    try:
        assert conn.execute_command("DEBUG", "DIGEST") == before
    finally:
        conn.close()
    assert product.control.describe_snapshot(multi_db_snapshot)["SnapshotStatus"] == "available"
    assert _s3_objects(product, multi_db_snapshot) == objects


# ------------------------------------------------------------------------------ layout rules
def test_multi_db_snapshot_into_cluster_mode(product: Product, multi_db_snapshot: str, targets: list[str]) -> None:
    objects = _s3_objects(product, multi_db_snapshot)
    targets.append("pf-mdb-up")
    err = _refused(
        product,
        "pf-mdb-up",
        InvalidParameterCombination,
        snapshot=multi_db_snapshot,
        num_shards=3,
        cluster_mode="enabled",
    )
    assert err.code == "InvalidParameterCombinationException"
    assert "[0, 3]" in str(err) and "cluster" in str(err)
    assert _nothing_healthy_left(product, "pf-mdb-up") is not None  # reserved, then marked failed
    assert product.control.describe_snapshot(multi_db_snapshot)["SnapshotStatus"] == "available"
    assert _s3_objects(product, multi_db_snapshot) == objects

    # The same snapshot restores fine into a cluster-mode-disabled cache, every db intact.
    targets.append("pf-mdb-same")
    output = _restore(product, "pf-mdb-same", snapshot=multi_db_snapshot, replicas=0)
    assert output["Status"] == "available"
    restored = connect(product.control.catalog.get_cache("pf-mdb-same")["Endpoints"][0], db=3)
    try:
        assert restored.get("in-db-3") == b"x" and restored.dbsize() == 2
    finally:
        restored.close()


def test_cluster_snapshot_into_cluster_disabled_needs_the_flag(
    product: Product, new_cache: Any, targets: list[str]
) -> None:
    cache = new_cache("pf-cme", cluster_mode=True, num_shards=2, replicas=0)
    fill_cluster(cache, keys=300)
    _snapshot(product, cache, "pf-cme-snap")
    targets.append("pf-cme-down")
    err = _refused(product, "pf-cme-down", InvalidParameterCombination, snapshot="pf-cme-snap", cluster_mode="disabled")
    assert "AllowClusterModeDisable" in str(err)
    assert _nothing_healthy_left(product, "pf-cme-down") is None
    assert product.control.describe_snapshot("pf-cme-snap")["SnapshotStatus"] == "available"


def test_data_tiering_snapshot_only_onto_data_tiering_nodes(
    product: Product, new_cache: Any, targets: list[str]
) -> None:
    cache = new_cache("pf-r6gd", replicas=0, node_type="cache.r6gd.xlarge")
    fill(cache["Endpoints"][0], keys=200)
    conn = connect(cache["Endpoints"][0])
    digest = conn.execute_command("DEBUG", "DIGEST")
    conn.close()
    _snapshot(product, cache, "pf-r6gd-snap")

    targets.append("pf-r7g")
    err = _refused(product, "pf-r7g", InvalidParameterCombination, snapshot="pf-r6gd-snap", node_type="cache.r7g.large")
    assert "r6gd" in str(err) and "cache.r7g.large" in str(err)
    assert _nothing_healthy_left(product, "pf-r7g") is None

    targets.append("pf-r6gd-ok")
    output = _restore(product, "pf-r6gd-ok", snapshot="pf-r6gd-snap", node_type="cache.r6gd.xlarge", replicas=0)
    assert output["Status"] == "available"
    record = product.control.catalog.get_cache("pf-r6gd-ok")
    assert record["CacheNodeType"] == "cache.r6gd.xlarge" and record["DataTiering"] == "enabled"
    conn = connect(record["Endpoints"][0])
    try:
        assert conn.execute_command("DEBUG", "DIGEST") == digest
    finally:
        conn.close()


# ------------------------------------------------------------------------------ RDB version
def _with_version(data: bytes, version: int) -> bytes:
    """The same RDB under another version number, CRC64 trailer recomputed."""
    body = b"REDIS%04d" % version + data[9:-8]
    return body + crc64(body).to_bytes(8, "little")


@pytest.mark.parametrize("version", [11, 12])
def test_too_new_rdb_is_refused(product: Product, targets: list[str], version: int) -> None:
    data = (FIXTURES / "valkey8_cluster_v11.rdb").read_bytes()
    assert data[:9] == b"REDIS0011"
    key = f"external/v{version}.rdb"  # not imports/: objects there start an import by themselves
    client("s3").put_object(Bucket=product.bucket, Key=key, Body=_with_version(data, version))
    target = f"pf-v{version}"
    targets.append(target)
    err = _refused(product, target, InvalidParameterCombination, s3_sources=[f"s3://{product.bucket}/{key}"])
    assert f"RDB version {version}" in str(err)
    assert "RDB version 10 at most" in str(err)  # the installed redis-server 7.0
    assert _nothing_healthy_left(product, target) is not None


# ------------------------------------------------------------------------------ corrupt objects
@pytest.mark.parametrize("damage", ["bit-flip", "truncated"])
def test_corrupt_snapshot_object_is_refused_before_any_write(
    product: Product, multi_db_snapshot: str, targets: list[str], tmp_path: Path, damage: str
) -> None:
    s3 = client("s3")
    key = storage.rdb_key(multi_db_snapshot, 1)
    original = s3.get_object(Bucket=product.bucket, Key=key)["Body"].read()
    if damage == "bit-flip":
        middle = len(original) // 2
        broken = original[:middle] + bytes([original[middle] ^ 0x01]) + original[middle + 1 :]
    else:
        broken = original[: len(original) - 100]
    s3.put_object(Bucket=product.bucket, Key=key, Body=broken)
    target = f"pf-{damage}"
    targets.append(target)
    try:
        err = _refused(product, target, ChecksumMismatch, snapshot=multi_db_snapshot)
        assert err.code == "SnapshotChecksumMismatch"
        assert key in str(err)
        record = _nothing_healthy_left(product, target)
        assert record is not None and record["FailureReason"].startswith("ChecksumMismatch")
        assert product.control.describe_snapshot(multi_db_snapshot)["SnapshotStatus"] == "available"
    finally:
        s3.put_object(Bucket=product.bucket, Key=key, Body=original)
    # With the object intact again the same target name restores (the failed record is replaced).
    output = _restore(product, target, snapshot=multi_db_snapshot, replicas=0)
    assert output["Status"] == "available"
    assert product.control.catalog.get_cache(target)["Status"] == "available"


@pytest.mark.parametrize("damage", ["bit-flip", "truncated"])
def test_corrupt_external_rdb_is_refused_before_any_write(
    product: Product, targets: list[str], damage: str
) -> None:
    """An RDB not made by cachevault has no manifest checksum: its own CRC64 and framing decide."""
    data = (FIXTURES / "valkey8_cluster_v11.rdb").read_bytes()
    good = _with_version(data, 10)  # loadable by the installed redis-server as far as the version goes
    middle = len(good) // 2
    broken = (
        good[:middle] + bytes([good[middle] ^ 0x01]) + good[middle + 1 :] if damage == "bit-flip" else good[:-200]
    )
    key = f"external/{damage}.rdb"
    client("s3").put_object(Bucket=product.bucket, Key=key, Body=broken)
    target = f"pf-ext-{damage}"
    targets.append(target)
    with pytest.raises(CacheVaultError) as refused:
        _restore(product, target, s3_sources=[f"s3://{product.bucket}/{key}"])
    err = refused.value
    assert err.code == "InvalidRdbFormat" and "offset" in str(err)  # where the file went wrong
    if damage == "bit-flip":
        assert "checksum" in str(err)
    record = _nothing_healthy_left(product, target)
    assert record is not None


# ------------------------------------------------------------------------------ request values
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"NumNodeGroups": 0, "ClusterMode": "enabled"}, "NumNodeGroups must be between 1 and 500, got 0"),
        ({"ReplicasPerNodeGroup": 6}, "ReplicasPerNodeGroup must be between 0 and 5, got 6"),
        ({"NumNodeGroups": "2"}, "NumNodeGroups must be an integer"),
        ({"CacheNodeType": "bogus"}, "Invalid CacheNodeType 'bogus'"),
        ({"CacheNodeType": ""}, "Invalid CacheNodeType ''"),
    ],
)
def test_the_state_machine_refuses_bad_values_as_given(
    product: Product, multi_db_snapshot: str, targets: list[str], fields: dict[str, Any], message: str
) -> None:
    """Started directly (not through the CLI or API checks): 0 is a value, never "not given"."""
    targets.append("pf-values")
    before = _s3_objects(product, multi_db_snapshot)
    payload = {"ReplicationGroupId": "pf-values", "SnapshotName": multi_db_snapshot, **fields}
    arn = product.control.start(RESTORE_SNAPSHOT, execution_name("restore", "pf-values"), payload)
    with pytest.raises(InvalidParameterValue, match=message):
        product.control.wait_execution(arn, timeout_s=60)
    assert product.control.catalog.find_cache("pf-values") is None  # refused before the name was reserved
    assert product.control.catalog.get_snapshot(multi_db_snapshot)["SnapshotStatus"] == "available"
    assert _s3_objects(product, multi_db_snapshot) == before
