"""The cache registry: caches cachevault can snapshot and restore into.

A cache is either one the local fleet made (real redis-server processes on 127.0.0.1,
``Managed: local``) or a user's own Redis/Valkey registered by its endpoints
(``Managed: external``). Either way the catalog record carries what preflight needs:
engine, version, cluster mode, node type label, data tiering, kind, endpoints, nodes.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Any

from cachevault import names, topology
from cachevault.catalog import Catalog
from cachevault.errors import (
    InvalidParameterCombination,
    InvalidParameterValue,
    ReplicationGroupAlreadyExistsFault,
    ReplicationGroupNotFoundFault,
)
from cachevault.settings import Settings

DEFAULT_NODE_TYPE = "cache.r7g.large"
KINDS = ("node-based", "serverless")


def _fleet(settings: Settings) -> Any:
    from cachevault.local.fleet import Fleet  # local-only: a Lambda on AWS never imports the fleet

    return Fleet(settings.state_dir)


def local_engine() -> tuple[str, str]:
    """(engine, version) of the redis-server binary the local fleet starts."""
    from cachevault.local.redis_process import server_path

    out = subprocess.run([server_path(), "--version"], capture_output=True, text=True, check=True, timeout=10)
    # "Redis server v=7.0.15 sha=..." / "Valkey server v=8.0.1 ..."
    engine = "valkey" if out.stdout.lower().startswith("valkey") else "redis"
    version = out.stdout.split("v=", 1)[1].split()[0]
    return engine, version


def registry_record(layout: Any, *, node_type: str, kind: str, data_tiering: bool) -> dict[str, Any]:
    primary = layout.shards[0].primary
    engine, version, rdb_version = topology.engine_info(primary.host, primary.port)
    nodes = []
    for index, shard in enumerate(layout.shards, start=1):
        group = f"{index:04d}"
        for node in [shard.primary, *shard.replicas]:
            nodes.append(
                {
                    "CacheNodeId": node.node_id,
                    "Address": f"{node.host}:{node.port}",
                    "NodeGroupId": group,
                    "Role": "primary" if node is shard.primary else "replica",
                }
            )
    return {
        "CacheName": layout.name,
        "Engine": engine,
        "EngineVersion": version,
        "MaxRdbVersion": rdb_version,
        "ClusterMode": bool(layout.cluster_mode),
        "CacheNodeType": node_type,
        "DataTiering": "enabled" if data_tiering else "disabled",
        "Kind": kind,
        "Managed": "local",
        "Status": "available",
        "NumNodeGroups": len(layout.shards),
        "ReplicasPerNodeGroup": len(layout.shards[0].replicas),
        "Endpoints": [f"{s.primary.host}:{s.primary.port}" for s in layout.shards],
        "Nodes": nodes,
    }


def validate_shape(*, cluster_mode: bool, num_shards: int, replicas: int, kind: str) -> None:
    if kind not in KINDS:
        raise InvalidParameterValue(f"Kind must be one of {', '.join(KINDS)}, not {kind!r}.")
    if not 1 <= num_shards <= 500:
        raise InvalidParameterValue("NumNodeGroups must be between 1 and 500.")
    if not 0 <= replicas <= 5:
        raise InvalidParameterValue("ReplicasPerNodeGroup must be between 0 and 5.")
    if num_shards > 1 and not cluster_mode:
        raise InvalidParameterCombination(
            "NumNodeGroups greater than 1 requires cluster mode enabled (ClusterMode=enabled)."
        )


def create_local_cache(
    name: str,
    *,
    cluster_mode: bool = False,
    num_shards: int = 1,
    replicas: int = 1,
    node_type: str = DEFAULT_NODE_TYPE,
    kind: str = "node-based",
    data_tiering: bool = False,
    seed_rdbs: list[Path] | None = None,
    extra: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Start the nodes, then register the cache; a half-made cache is never left registered."""
    settings = settings or Settings.from_env()
    name = names.cache_name(name)
    validate_shape(cluster_mode=cluster_mode, num_shards=num_shards, replicas=replicas, kind=kind)
    catalog = Catalog(settings)
    if catalog.find_cache(name) is not None:
        raise ReplicationGroupAlreadyExistsFault(f"Replication group {name!r} already exists.")
    fleet = _fleet(settings)
    layout = fleet.create_cache(
        name,
        cluster_mode=cluster_mode,
        num_shards=num_shards,
        replicas_per_shard=replicas,
        seed_rdbs=seed_rdbs,
        # A cache lives until it is deleted, not until the process that made it exits.
        detached=True,
    )
    try:
        record = registry_record(layout, node_type=node_type, kind=kind, data_tiering=data_tiering)
        record.update(extra or {})
        return catalog.register_cache(record)
    except Exception:
        fleet.destroy_cache(name)
        raise


def delete_local_cache(name: str, settings: Settings | None = None) -> None:
    settings = settings or Settings.from_env()
    catalog = Catalog(settings)
    cache = catalog.get_cache(names.cache_name(name))
    if cache.get("Managed") == "local":
        # No nodes left on disk is fine: a failed restore already stopped them and kept
        # only its record (status failed), which must still be deletable and reusable.
        with contextlib.suppress(ReplicationGroupNotFoundFault):
            _fleet(settings).destroy_cache(cache["CacheName"])
    catalog.delete_cache(cache["CacheName"])


def describe_cache(name: str, settings: Settings | None = None) -> dict[str, Any]:
    """The registry record plus the live topology (shards, slots, replica health)."""
    settings = settings or Settings.from_env()
    cache = Catalog(settings).get_cache(names.cache_name(name))
    seeds = [(e.rpartition(":")[0], int(e.rpartition(":")[2])) for e in cache.get("Endpoints", [])]
    try:
        topo = topology.discover(seeds)
    except Exception as exc:  # describe must still answer for a cache that is down
        cache["NodeGroups"] = []
        cache["TopologyError"] = str(exc)
        return cache
    cache["NodeGroups"] = [
        {
            "NodeGroupId": f"{i:04d}",
            "Slots": ",".join(f"{a}-{b}" for a, b in shard.slots) if topo.cluster_mode else None,
            "Primary": f"{shard.primary.host}:{shard.primary.port}",
            "Replicas": [
                {"Address": f"{r.host}:{r.port}", "LinkUp": r.link_up, "LagBytes": r.lag_bytes}
                for r in shard.replicas
            ],
        }
        for i, shard in enumerate(topo.shards, start=1)
    ]
    return cache
