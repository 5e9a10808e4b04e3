"""The snapshot record as DynamoDB stores it: compact enough for 500 shards in one item (400 KB).

A record's ``NodeSnapshots`` has one entry per shard. Two things keep it small:

* each entry keeps what the catalog's readers use (ElastiCache's describe fields, size,
  checksum, key count, what `snapshot describe` shows); the rest of the capture's details
  (start/end times, keys per database, RDB version per shard) live in the manifest, which
  is the durable truth;
* ``S3Key`` is not stored when it is the standard ``storage.rdb_key(SnapshotName, shard)``
  (it holds the snapshot name twice: ~530 bytes per shard for a 255-character name) and is
  filled back on every read.
"""

from __future__ import annotations

from typing import Any

from cachevault.catalog import storage

# The record fields that are ElastiCache's own Snapshot fields, under its names: events and
# the CLI's describe shapes both copy them as they are.
ELASTICACHE_SNAPSHOT_FIELDS = (
    "SnapshotName",
    "ReplicationGroupId",
    "SnapshotStatus",
    "SnapshotSource",
    "CacheNodeType",
    "Engine",
    "EngineVersion",
    "NumNodeGroups",
)

# What a finished shard keeps in the record (the manifest keeps everything).
RECORD_NODE_FIELDS = (
    "NodeGroupId",
    "CacheNodeId",
    "SourceRole",
    "CaptureStatus",
    "S3Key",
    "NodeGroupConfiguration",
    "Size",
    "Sha256",
    "KeyCount",
    "CacheSize",
    "SnapshotCreateTime",
    # shown by `snapshot describe` (cli/shapes.py, cli/snapshot_cmd.py)
    "CaptureSeconds",
    "CaptureMode",
    "ReplicationId",
    "ReplicationOffset",
)


def record_entry(node: dict[str, Any]) -> dict[str, Any]:
    """A finished shard's entry as the record keeps it."""
    return {k: node[k] for k in RECORD_NODE_FIELDS if k in node}


def _standard_key(name: str, node: dict[str, Any]) -> str | None:
    group = str(node.get("NodeGroupId", ""))
    return storage.rdb_key(name, int(group)) if group.isdigit() and 1 <= int(group) <= 9999 else None


def stored_nodes(name: str, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for node in nodes:
        if node.get("S3Key") and node["S3Key"] == _standard_key(name, node):
            node = {k: v for k, v in node.items() if k != "S3Key"}
        out.append(node)
    return out


def stored(record: dict[str, Any]) -> dict[str, Any]:
    if not record.get("NodeSnapshots"):
        return record
    return {**record, "NodeSnapshots": stored_nodes(record["SnapshotName"], record["NodeSnapshots"])}


def loaded(item: dict[str, Any]) -> dict[str, Any]:
    """A record as read: every entry has its ``S3Key``."""
    for node in item.get("NodeSnapshots") or []:
        if "S3Key" not in node:
            key = _standard_key(item["SnapshotName"], node)
            if key:
                node["S3Key"] = key
    return item
