"""ElastiCache's snapshot constraints, one rule per function, each with its error code.

Every rule runs before anything is touched (no lock, no record, no S3 object). A rule
either passes, raises the ElastiCache fault a user of CreateSnapshot would get, or (for
the memory headroom rule) returns a warning that is carried in the result and logged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from cachevault.core.errors import (
    InvalidParameterCombination,
    InvalidParameterValue,
    InvalidReplicationGroupState,
    SnapshotAlreadyExistsFault,
    SnapshotFeatureNotSupportedFault,
    SnapshotQuotaExceededFault,
)
from cachevault.core.timeutil import utcnow

MANUAL_QUOTA_NODE_BASED = 20  # manual snapshots per node in a rolling 24 h (ElastiCache quota)
MANUAL_QUOTA_SERVERLESS = 24  # manual snapshots per serverless cache in a rolling 24 h
QUOTA_WINDOW = timedelta(hours=24)
SNAPSHOT_ENGINES = ("redis", "valkey")


@dataclass
class SnapshotRequest:
    snapshot_name: str
    cache_name: str
    source: str = "manual"  # ElastiCache SnapshotSource: manual | automated
    source_node: str | None = None
    final: bool = False


@dataclass
class PreflightContext:
    request: SnapshotRequest
    cache: dict[str, Any]
    catalog: Any
    # Memory facts of the nodes a snapshot may read: {node_id: {"used_memory", "maxmemory", ...}}
    node_memory: dict[str, dict[str, int]] = field(default_factory=dict)
    # CacheNodeIds the snapshot will read (one per shard), predicted from the live topology.
    source_nodes: list[str] = field(default_factory=list)
    reserved_memory_percent: int = 25
    warnings: list[str] = field(default_factory=list)


Rule = Callable[[PreflightContext], None]


def engine_supports_snapshots(ctx: PreflightContext) -> None:
    engine = str(ctx.cache.get("Engine", "")).lower()
    if engine in SNAPSHOT_ENGINES:
        return
    if engine == "memcached" and ctx.cache.get("Kind") == "serverless":
        return
    raise SnapshotFeatureNotSupportedFault(
        f"Snapshots are not supported for engine {engine!r} on a {ctx.cache.get('Kind', 'node-based')} "
        "cache: only Redis OSS and Valkey caches (and serverless Memcached) can be snapshotted."
    )


def node_type_supports_snapshots(ctx: PreflightContext) -> None:
    if ctx.cache.get("CacheNodeType") == "cache.t1.micro" and not ctx.cache.get("ClusterMode"):
        raise SnapshotFeatureNotSupportedFault(
            "Snapshots are not supported for node type cache.t1.micro when cluster mode is disabled."
        )


def cluster_level_only(ctx: PreflightContext) -> None:
    if ctx.cache.get("ClusterMode") and ctx.request.source_node:
        raise InvalidParameterCombination(
            f"Cache {ctx.cache['CacheName']!r} has cluster mode enabled: snapshots are taken at the "
            f"cluster level; a shard- or node-level request (source node {ctx.request.source_node!r}) "
            "is not supported."
        )


def source_node_is_member(ctx: PreflightContext) -> None:
    """A named source node must belong to the cache, checked before a record exists."""
    wanted = ctx.request.source_node
    nodes = ctx.cache.get("Nodes") or []
    if not wanted or not nodes:
        return  # a cache registered by endpoints only: SelectSources checks the live topology
    for node in nodes:
        if wanted.lower() == str(node.get("CacheNodeId", "")).lower() or wanted == node.get("Address"):
            return
    known = ", ".join(str(n.get("CacheNodeId")) for n in nodes)
    raise InvalidParameterValue(
        f"Source node {wanted!r} is not a node of replication group {ctx.cache['CacheName']!r} "
        f"(its nodes: {known})."
    )


def cache_is_healthy(ctx: PreflightContext) -> None:
    status = ctx.cache.get("Status")
    if status != "available":
        raise InvalidReplicationGroupState(
            f"Replication group {ctx.cache['CacheName']!r} is {status!r}; it must be 'available' to "
            "take a snapshot."
        )
    locked_by = ctx.cache.get("LockedBy")
    if locked_by:
        raise InvalidReplicationGroupState(
            f"Replication group {ctx.cache['CacheName']!r} is busy: {ctx.cache.get('LockedFor')} "
            f"{locked_by!r} is in progress."
        )


def name_is_free(ctx: PreflightContext) -> None:
    if ctx.catalog.find_snapshot(ctx.request.snapshot_name) is not None:
        raise SnapshotAlreadyExistsFault(f"Snapshot {ctx.request.snapshot_name!r} already exists.")


def within_quota(ctx: PreflightContext) -> None:
    """ElastiCache's rolling 24 h quota: per source node (node-based), per cache (serverless)."""
    if ctx.request.source != "manual":
        return  # ElastiCache's quota counts manual snapshots only
    name = ctx.cache["CacheName"]
    recent = ctx.catalog.snapshots_created_since(name, utcnow() - QUOTA_WINDOW, source="manual")
    if ctx.cache.get("Kind") == "serverless":
        if len(recent) >= MANUAL_QUOTA_SERVERLESS:
            raise SnapshotQuotaExceededFault(
                f"Replication group {name!r} already has {len(recent)} manual snapshots in the last 24 hours; "
                f"the quota is {MANUAL_QUOTA_SERVERLESS} per serverless cache per 24 hours.",
                Limit=MANUAL_QUOTA_SERVERLESS,
                Count=len(recent),
            )
        return
    # Without a predicted source (no live topology), every recent snapshot counts: never too lenient.
    for node in ctx.source_nodes or [None]:
        used = [s for s in recent if node is None or node in _source_nodes(s)]
        if len(used) >= MANUAL_QUOTA_NODE_BASED:
            where = f"node {node}" if node else "its nodes"
            raise SnapshotQuotaExceededFault(
                f"Replication group {name!r} already has {len(used)} manual snapshots from {where} in the "
                f"last 24 hours; the quota is {MANUAL_QUOTA_NODE_BASED} per node per 24 hours.",
                Limit=MANUAL_QUOTA_NODE_BASED,
                Count=len(used),
                CacheNodeId=node,
            )


def manual_snapshots_per_node(catalog: Any, cache_name: str) -> Counter[str]:
    """CacheNodeId -> manual snapshots read from it in the rolling 24 h (the per-node quota's count)."""
    recent = catalog.snapshots_created_since(cache_name, utcnow() - QUOTA_WINDOW, source="manual")
    return Counter(node for snapshot in recent for node in _source_nodes(snapshot))


def _source_nodes(snapshot: dict[str, Any]) -> set[str]:
    return {str(n.get("CacheNodeId")) for n in snapshot.get("NodeSnapshots", [])}


WARNED_NODES = 5  # memory warnings named one by one


def memory_headroom(ctx: PreflightContext) -> None:
    """Warn when the fork's copy-on-write may page: reserved memory below the configured share.

    Reserved memory is what the node keeps outside the dataset limit: system memory minus
    maxmemory (or minus used memory when no maxmemory is set).
    """
    pct = ctx.reserved_memory_percent
    low = []
    for node, mem in ctx.node_memory.items():
        total = mem.get("total_system_memory") or 0
        if not total:
            continue
        limit = mem.get("maxmemory") or mem.get("used_memory", 0)
        reserved = max(total - limit, 0)
        if reserved * 100 < pct * total:
            low.append(f"Node {node}: reserved memory is {reserved * 100 // total}% of {total} bytes")
    # One warning per node up to a few; beyond, one line for the rest: the warnings travel in
    # the state payload (256 KB) and the snapshot record (400 KB) of a 500-shard snapshot too.
    advice = f"below reserved-memory-percent {pct}%; the snapshot's fork may page (copy-on-write)."
    ctx.warnings.extend(f"{line}, {advice}" for line in low[:WARNED_NODES])
    if len(low) > WARNED_NODES:
        ctx.warnings.append(f"{len(low) - WARNED_NODES} more nodes reserve less memory than that, {advice}")


RULES: tuple[Rule, ...] = (
    engine_supports_snapshots,
    node_type_supports_snapshots,
    cluster_level_only,
    source_node_is_member,
    cache_is_healthy,
    name_is_free,
    within_quota,
    memory_headroom,
)


def run(ctx: PreflightContext, rules: tuple[Rule, ...] = RULES) -> list[str]:
    for rule in rules:
        rule(ctx)
    return ctx.warnings
