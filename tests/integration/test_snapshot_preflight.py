"""CreateSnapshot's preflight: one test per ElastiCache constraint, through the state machine.

Each refusal must carry the ElastiCache error (class and code), read clearly (no Lambda
error JSON), and leave nothing behind: no S3 object, no multipart upload, no snapshot
record, no lock. Caches the rules refuse before touching a node are registry records of
external caches (a memcached cluster cannot be started here); the rest are real
redis-server caches.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from cachevault.core import names
from cachevault.core.errors import (
    CacheVaultError,
    InvalidParameterCombination,
    InvalidParameterValue,
    InvalidReplicationGroupState,
    ReplicationGroupNotFoundFault,
    SnapshotAlreadyExistsFault,
    SnapshotFeatureNotSupportedFault,
    SnapshotQuotaExceededFault,
)
from cachevault.core.timeutil import iso, utcnow
from cachevault.ops.control_plane import CREATE_SNAPSHOT, execution_name
from cachevault.snapshot import preflight

from tests.product_fixtures import Product, connect, fill, node_addresses, sync_replicas

_fake_names = itertools.count(1)


@pytest.fixture
def fake_cache(product: Product) -> Iterator[Callable[..., dict[str, Any]]]:
    """Register an external cache record (no processes): enough for rules that read the registry."""
    made: list[str] = []

    def make(prefix: str, **fields: Any) -> dict[str, Any]:
        record = {
            "CacheName": f"{prefix}-{next(_fake_names)}",
            "Engine": "redis",
            "EngineVersion": "7.0.15",
            "Kind": "node-based",
            "Managed": "external",
            "Status": "available",
            "ClusterMode": False,
            "CacheNodeType": "cache.r7g.large",
            "NumNodeGroups": 1,
            "Endpoints": ["127.0.0.1:1"],  # nothing listens: a rule that reached a node would fail loudly
            "Nodes": [],
            **fields,
        }
        made.append(record["CacheName"])
        return product.control.catalog.register_cache(record)

    yield make
    for name in made:
        product.control.catalog.delete_cache(name)


def _refused(
    product: Product,
    cache: str,
    snapshot: str,
    error: type[CacheVaultError],
    match: str,
    **kwargs: Any,
) -> CacheVaultError:
    """create_snapshot raises ``error``, and nothing was written anywhere."""
    keys, uploads = product.s3_keys(), product.multipart_uploads()
    cache_before = product.control.catalog.find_cache(cache)
    with pytest.raises(error, match=match) as raised:
        product.control.create_snapshot(cache, snapshot, **kwargs)
    err = raised.value
    assert type(err) is error and err.code == error.code
    assert "errorType" not in err.message and "stackTrace" not in err.message  # a sentence, not Lambda JSON
    assert product.s3_keys() == keys
    assert product.multipart_uploads() == uploads
    assert product.control.catalog.find_cache(cache) == cache_before  # no lock taken, nothing changed
    return err


def _no_record(product: Product, snapshot: str) -> None:
    assert product.control.catalog.find_snapshot(snapshot.lower()) is None


def _insert_snapshots(
    product: Product, cache: str, count: int, *, source: str = "manual", age_h: float = 0, node: str = ""
) -> None:
    for i in range(count):
        created = utcnow() - timedelta(hours=age_h, minutes=i + 1)
        name = f"automatic.{cache}-{i}-{int(age_h)}" if source == "automated" else f"{cache}-old{int(age_h)}-{i}"
        product.control.catalog.create_snapshot(
            {
                "SnapshotName": name,
                "ReplicationGroupId": cache,
                "SnapshotStatus": "available",
                "SnapshotSource": source,
                "SnapshotCreateTime": iso(created),
                "NodeSnapshots": [{"NodeGroupId": "0001", "CacheNodeId": node}] if node else [],
            }
        )


# --------------------------------------------------------------------------- engine
def test_memcached_node_based_is_not_supported(product: Product, fake_cache: Any) -> None:
    cache = fake_cache("mc", Engine="memcached", EngineVersion="1.6.22")
    err = _refused(product, cache["CacheName"], "mc-snap", SnapshotFeatureNotSupportedFault, "engine 'memcached'")
    assert err.code == "SnapshotFeatureNotSupportedFault"
    _no_record(product, "mc-snap")


def test_engine_rule_allows_serverless_memcached_and_redis_valkey() -> None:
    def check(**cache: Any) -> None:
        ctx = preflight.PreflightContext(
            request=preflight.SnapshotRequest("s", "c"), cache={"CacheName": "c", **cache}, catalog=None
        )
        preflight.engine_supports_snapshots(ctx)

    check(Engine="memcached", Kind="serverless")
    check(Engine="redis", Kind="node-based")
    check(Engine="valkey", Kind="serverless")
    with pytest.raises(SnapshotFeatureNotSupportedFault):
        check(Engine="memcached", Kind="node-based")


# --------------------------------------------------------------------------- node type
def test_t1_micro_without_cluster_mode_is_not_supported(product: Product, fake_cache: Any) -> None:
    cache = fake_cache("micro", CacheNodeType="cache.t1.micro")
    _refused(product, cache["CacheName"], "micro-snap", SnapshotFeatureNotSupportedFault, "cache.t1.micro")
    _no_record(product, "micro-snap")
    # With cluster mode enabled the node type is no obstacle (the rule passes).
    ctx = preflight.PreflightContext(
        request=preflight.SnapshotRequest("s", "c"),
        cache={"CacheName": "c", "CacheNodeType": "cache.t1.micro", "ClusterMode": True},
        catalog=None,
    )
    preflight.node_type_supports_snapshots(ctx)


# --------------------------------------------------------------------------- cluster level only
def test_cluster_mode_refuses_a_node_level_request(product: Product, fake_cache: Any) -> None:
    nodes = [{"CacheNodeId": "cl-0001-002", "Address": "127.0.0.1:2", "NodeGroupId": "0001", "Role": "replica"}]
    cache = fake_cache("cl", ClusterMode=True, NumNodeGroups=2, Nodes=nodes)
    err = _refused(
        product, cache["CacheName"], "cl-snap", InvalidParameterCombination, "cluster level", source_node="cl-0001-002"
    )
    assert err.code == "InvalidParameterCombinationException"
    _no_record(product, "cl-snap")


# --------------------------------------------------------------------------- quotas
def test_manual_quota_per_node_based_cache(product: Product, new_cache: Any) -> None:
    cache = new_cache("quota", replicas=1)
    name = cache["CacheName"]
    fill(cache["Endpoints"][0], keys=100)
    replica = f"{name}-0001-002"  # the only replica: the node the next snapshot would read
    _insert_snapshots(product, name, 20, node=replica)
    _insert_snapshots(product, name, 5, age_h=25, node=replica)  # outside the rolling window
    _insert_snapshots(product, name, 3, source="automated", node=replica)  # automated ones do not count

    err = _refused(product, name, "one-too-many", SnapshotQuotaExceededFault, "20 manual snapshots")
    assert f"already has 20 manual snapshots from node {replica} in the last 24 hours" in err.message
    assert "the quota is 20 per node per 24 hours" in err.message
    _no_record(product, "one-too-many")

    # The quota is per node: the primary has none of those 20, so a snapshot read from it is allowed.
    primary_ctx = preflight.PreflightContext(
        request=preflight.SnapshotRequest("from-primary", name),
        cache=product.control.catalog.get_cache(name),
        catalog=product.control.catalog,
        source_nodes=[f"{name}-0001-001"],
    )
    preflight.within_quota(primary_ctx)
    _no_record(product, "one-too-many")

    # The quota is for manual snapshots: the automatic one still runs, for real.
    automatic = f"automatic.{name}-2026-11-24-10-00"
    started = product.control.create_snapshot(name, automatic, source="automated")
    assert started["SnapshotSource"] == "automated"
    record = product.control.wait_snapshot(automatic, timeout_s=60)
    assert record["SnapshotStatus"] == "available" and record["SnapshotSource"] == "automated"

    # 19 in the window: the rule lets the 20th through (the 25 h old ones are not counted).
    product.control.catalog.delete_snapshot_record(f"{name}-old0-0")
    ctx = preflight.PreflightContext(
        request=preflight.SnapshotRequest("next", name),
        cache=product.control.catalog.get_cache(name),
        catalog=product.control.catalog,
    )
    preflight.within_quota(ctx)


def test_manual_quota_per_serverless_cache_is_24(product: Product, fake_cache: Any) -> None:
    cache = fake_cache("sl", Kind="serverless")
    name = cache["CacheName"]
    _insert_snapshots(product, name, 23)
    ctx = preflight.PreflightContext(
        request=preflight.SnapshotRequest("next", name), cache=cache, catalog=product.control.catalog
    )
    preflight.within_quota(ctx)  # 23 < 24: a node-based cache would already be refused
    _insert_snapshots(product, name, 1, age_h=1)
    err = _refused(product, name, "sl-25th", SnapshotQuotaExceededFault, "quota is 24 per serverless cache")
    assert "already has 24 manual snapshots" in err.message
    _no_record(product, "sl-25th")


# --------------------------------------------------------------------------- duplicate names
def test_duplicate_name_leaves_the_first_snapshot_alone(product: Product, new_cache: Any) -> None:
    cache = new_cache("dup", replicas=1)
    fill(cache["Endpoints"][0], keys=100)
    product.control.create_snapshot(cache["CacheName"], "twice")
    first = product.control.wait_snapshot("twice", timeout_s=60)
    objects = product.s3_keys("snapshots/twice/")
    assert objects == ["snapshots/twice/manifest.json", "snapshots/twice/twice-0001.rdb"]

    err = _refused(product, cache["CacheName"], "TWICE", SnapshotAlreadyExistsFault, "'twice' already exists")
    assert err.code == "SnapshotAlreadyExistsFault"
    assert product.control.describe_snapshot("twice") == first
    assert product.s3_keys("snapshots/twice/") == objects


# --------------------------------------------------------------------------- cache must exist and be healthy
def test_unknown_cache(product: Product) -> None:
    with pytest.raises(ReplicationGroupNotFoundFault, match="'no-such-cache' not found") as raised:
        product.control.create_snapshot("no-such-cache", "orphan")
    assert raised.value.code == "ReplicationGroupNotFoundFault"
    _no_record(product, "orphan")
    assert product.s3_keys("snapshots/orphan/") == []


def test_cache_not_available(product: Product, fake_cache: Any) -> None:
    cache = fake_cache("mod", Status="modifying")
    err = _refused(product, cache["CacheName"], "mod-snap", InvalidReplicationGroupState, "is 'modifying'")
    assert err.code == "InvalidReplicationGroupStateFault"
    _no_record(product, "mod-snap")


def test_cache_busy_with_another_operation(product: Product, new_cache: Any) -> None:
    cache = new_cache("busy", replicas=1)
    product.control.catalog.lock_cache(cache["CacheName"], "other", "snapshot")
    _refused(product, cache["CacheName"], "busy-snap", InvalidReplicationGroupState, "busy: snapshot 'other'")
    _no_record(product, "busy-snap")
    assert product.control.catalog.get_cache(cache["CacheName"])["LockedBy"] == "other"  # not stolen, not freed
    product.control.catalog.unlock_cache(cache["CacheName"], "other")


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    ("raw", "why"),
    [("Bad--name", "consecutive hyphens"), ("9abc", "begin with a letter"), ("automatic.x", "reserved")],
)
def test_bad_snapshot_names(product: Product, fake_cache: Any, raw: str, why: str) -> None:
    cache = fake_cache("names")
    err = _refused(product, cache["CacheName"], raw, InvalidParameterValue, why)
    assert err.code == "InvalidParameterValueException"
    _no_record(product, raw)
    # The state machine's own Preflight refuses it too (the HTTP/Lambda entry is no way around it).
    payload = {"SnapshotName": raw, "ReplicationGroupId": cache["CacheName"], "SnapshotSource": "manual"}
    arn = product.control.start(CREATE_SNAPSHOT, execution_name("snapshot", "bad"), payload)
    with pytest.raises(InvalidParameterValue, match=why):
        product.control.wait_execution(arn, timeout_s=30, interval_s=0.1)
    _no_record(product, raw)


def test_bad_cache_name(product: Product) -> None:
    with pytest.raises(InvalidParameterValue, match="ReplicationGroupId"):
        product.control.create_snapshot("bad_cache", "fine-name")
    _no_record(product, "fine-name")


# --------------------------------------------------------------------------- memory headroom
def test_low_reserved_memory_warns_but_snapshots(product: Product, new_cache: Any) -> None:
    cache = new_cache("mem", replicas=2)
    fill(cache["Endpoints"][0], keys=100)
    for address in node_addresses(cache, "replica"):
        conn = connect(address)
        try:
            total = int(conn.info("memory")["total_system_memory"])
            conn.config_set("maxmemory", total * 9 // 10)
        finally:
            conn.close()

    started = product.control.create_snapshot(cache["CacheName"], "tight")
    record = product.control.wait_snapshot("tight", timeout_s=60)
    assert record["SnapshotStatus"] == "available"
    # The warning names the node whose fork is at risk: the replica the snapshot read.
    source = record["NodeSnapshots"][0]["CacheNodeId"]
    assert source in {n["CacheNodeId"] for n in cache["Nodes"] if n["Role"] == "replica"}
    assert len(record["Warnings"]) == 1
    assert record["Warnings"][0].startswith(f"Node {source}: reserved memory is 10%")
    assert "reserved-memory-percent 25%" in record["Warnings"][0]
    assert started["Warnings"] == record["Warnings"]
    output = product.control.wait_execution(started["ExecutionArn"], timeout_s=30)
    assert output["Warnings"] == record["Warnings"]
    assert names.snapshot_name("tight") == output["SnapshotName"]


# --------------------------------------------------------------------------- source node rules
def _role_of(cache: dict[str, Any], node_id: str) -> str:
    return next(n["Role"] for n in cache["Nodes"] if n["CacheNodeId"] == node_id)


def test_cache_without_replica_is_snapshotted_from_the_primary_with_a_warning(
    product: Product, new_cache: Any
) -> None:
    cache = new_cache("solo", replicas=0)
    fill(cache["Endpoints"][0], keys=50)
    started = product.control.create_snapshot(cache["CacheName"], "solo-snap")
    record = product.control.wait_snapshot("solo-snap", execution_arn=started["ExecutionArn"])
    assert record["SnapshotStatus"] == "available"
    (node,) = record["NodeSnapshots"]
    assert node["SourceRole"] == "primary"
    (warning,) = record["Warnings"]
    assert "no healthy replica (the shard has no replica), so the snapshot is taken from the primary " in warning
    assert node["CacheNodeId"] in warning
    assert started["Warnings"] == record["Warnings"]  # known at preflight, shown by create


def test_shard_with_its_replica_down_is_snapshotted_from_the_primary_with_a_warning(
    product: Product, new_cache: Any
) -> None:
    cache = new_cache("down", replicas=1)
    fill(cache["Endpoints"][0], keys=50)
    (replica,) = [n["CacheNodeId"] for n in cache["Nodes"] if n["Role"] == "replica"]
    product.kill_node(replica)
    started = product.control.create_snapshot(cache["CacheName"], "down-snap")
    record = product.control.wait_snapshot("down-snap", execution_arn=started["ExecutionArn"])
    assert record["SnapshotStatus"] == "available"
    assert record["NodeSnapshots"][0]["SourceRole"] == "primary"
    (warning,) = record["Warnings"]
    assert f"no healthy replica (replicas down or unreachable: {replica})" in warning
    assert "its fork can add latency for writers" in warning


def test_primary_named_as_source_is_used_with_a_warning(product: Product, new_cache: Any) -> None:
    cache = new_cache("named", replicas=1)
    fill(cache["Endpoints"][0], keys=50)
    (primary,) = [n["CacheNodeId"] for n in cache["Nodes"] if n["Role"] == "primary"]
    started = product.control.create_snapshot(cache["CacheName"], "named-snap", source_node=primary)
    record = product.control.wait_snapshot("named-snap", execution_arn=started["ExecutionArn"])
    assert record["NodeSnapshots"][0]["CacheNodeId"] == primary
    (warning,) = record["Warnings"]
    assert f"taken from the primary {primary}, as asked (SourceNode)" in warning


def test_healthy_replica_is_never_skipped_for_the_primary(product: Product, new_cache: Any) -> None:
    cache = new_cache("healthy", replicas=1)
    fill(cache["Endpoints"][0], keys=50)
    started = product.control.create_snapshot(cache["CacheName"], "healthy-snap")
    record = product.control.wait_snapshot("healthy-snap", execution_arn=started["ExecutionArn"])
    assert record["NodeSnapshots"][0]["SourceRole"] == "replica"
    assert record["Warnings"] == []


def test_quota_is_per_node_and_the_next_healthy_replica_is_tried(product: Product, new_cache: Any) -> None:
    cache = new_cache("next", replicas=2)
    name = cache["CacheName"]
    fill(cache["Endpoints"][0], keys=50)
    sync_replicas(cache["Endpoints"][0], 2)
    # The replica the snapshot would read now has used its quota; the other has none used.
    first = product.control.create_snapshot(name, "next-first")
    first_record = product.control.wait_snapshot("next-first", execution_arn=first["ExecutionArn"])
    used_up = first_record["NodeSnapshots"][0]["CacheNodeId"]
    assert _role_of(cache, used_up) == "replica"
    _insert_snapshots(product, name, 19, node=used_up)  # with next-first: 20 from that node

    started = product.control.create_snapshot(name, "next-second")
    record = product.control.wait_snapshot("next-second", execution_arn=started["ExecutionArn"])
    source = record["NodeSnapshots"][0]["CacheNodeId"]
    assert source != used_up and _role_of(cache, source) == "replica"
    assert record["Warnings"] == []

    # Both replicas used up: refused with the quota error, never moved onto the primary.
    _insert_snapshots(product, name, 19, node=source, age_h=1)
    err = _refused(product, name, "next-third", SnapshotQuotaExceededFault, "20 manual snapshots")
    assert "the quota is 20 per node per 24 hours" in err.message
    _no_record(product, "next-third")
