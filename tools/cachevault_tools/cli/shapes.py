"""ElastiCache response shapes for ``--json``: what the AWS CLI prints, so the same jq works.

Field names and nesting follow botocore's ``data/elasticache/2015-02-02/service-2.json``
(``Snapshot``, ``NodeSnapshot``, ``NodeGroupConfiguration``, ``ReplicationGroup``,
``NodeGroup``, ``NodeGroupMember``, ``Endpoint``). What ElastiCache has no field for
(S3 keys, checksums, capture progress, verification) goes under one key, ``CacheVault``.
"""

from __future__ import annotations

import os
from typing import Any

from cachevault.catalog.snapshot_record import ELASTICACHE_SNAPSHOT_FIELDS

from cachevault_tools.cli.units import iec_bytes

EXTRAS = "CacheVault"

# Internal snapshot fields that are ElastiCache's own, copied as they are.
_SNAPSHOT_FIELDS = (*ELASTICACHE_SNAPSHOT_FIELDS, "DataTiering")
_NODE_EXTRAS = (
    "CaptureStatus",
    "SourceRole",
    "S3Key",
    "Sha256",
    "BytesCaptured",
    "RateBytesPerSecond",
    "CaptureSeconds",
    "CaptureMode",
    "CaptureError",
    "ReplicationId",
    "ReplicationOffset",
)
_SNAPSHOT_EXTRAS = (
    "Bucket",
    "ManifestKey",
    "RdbVersion",
    "FinalSnapshot",
    "FailureReason",
    "Warnings",
    "ExecutionArn",
    "ExecutionName",
    "CopyExecution",
    "SlotsPerNodeGroup",
)


class ArnBuilder:
    """ElastiCache ARNs in the account and region the stack's state machines live in."""

    def __init__(self, stack: Any) -> None:
        region, account = "us-east-1", "000000000000"
        for arn in getattr(stack, "state_machines", {}).values():
            parts = str(arn).split(":")
            if len(parts) > 4:
                region, account = parts[3], parts[4]
                break
        self.region, self.account = region, account

    def __call__(self, kind: str, name: str) -> str:
        return f"arn:aws:elasticache:{self.region}:{self.account}:{kind}:{name}"


def cluster_mode(value: Any) -> str:
    """ElastiCache's ``ClusterMode`` string from our boolean."""
    if isinstance(value, str):
        return value
    return "enabled" if value else "disabled"


def snapshot(record: dict[str, Any], arn: ArnBuilder, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """One ``Snapshot`` as DescribeSnapshots returns it, extras under ``CacheVault``."""
    cache = cache or {}
    out: dict[str, Any] = {k: record[k] for k in _SNAPSHOT_FIELDS if record.get(k) is not None}
    out["ARN"] = arn("snapshot", record["SnapshotName"])
    out["ClusterMode"] = cluster_mode(record.get("ClusterMode"))
    out["AutomaticFailover"] = "enabled" if record.get("ClusterMode") else "disabled"
    out["SnapshotRetentionLimit"] = int(record.get("SnapshotRetentionLimit", cache.get("SnapshotRetentionLimit", 0)))
    window = record.get("SnapshotWindow", cache.get("SnapshotWindow"))
    if window:
        out["SnapshotWindow"] = window
    kms = record.get("KmsKeyId") or os.environ.get("SNAPSHOT_KMS_KEY_ID")
    if kms:
        out["KmsKeyId"] = kms
    if record.get("SnapshotCreateTime"):
        out["CacheClusterCreateTime"] = cache.get("CacheCreateTime", record["SnapshotCreateTime"])
    nodes = record.get("NodeSnapshots", [])
    out["NodeSnapshots"] = [_node_snapshot(n, record, cache) for n in nodes]
    total = _total_bytes(record)
    extras: dict[str, Any] = {k: record[k] for k in _SNAPSHOT_EXTRAS if record.get(k) not in (None, [], "")}
    extras["SizeBytes"] = total
    out[EXTRAS] = extras
    return out


def _node_snapshot(node: dict[str, Any], record: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
    group = node.get("NodeGroupId")
    size = _node_bytes(node)
    config: dict[str, Any] = {"NodeGroupId": group}
    slots = (node.get("NodeGroupConfiguration") or {}).get("Slots")
    if slots:
        config["Slots"] = slots
    if cache.get("ReplicasPerNodeGroup") is not None:
        config["ReplicaCount"] = int(cache["ReplicasPerNodeGroup"])
    out: dict[str, Any] = {
        "CacheClusterId": f"{record.get('ReplicationGroupId')}-{group}",
        "NodeGroupId": group,
        "CacheNodeId": node.get("CacheNodeId"),
        "NodeGroupConfiguration": config,
        "CacheSize": iec_bytes(size),
    }
    if node.get("SnapshotCreateTime"):
        out["SnapshotCreateTime"] = node["SnapshotCreateTime"]
    extras = {k: node[k] for k in _NODE_EXTRAS if node.get(k) is not None}
    extras["SizeBytes"] = size
    out[EXTRAS] = extras
    return out


def _node_bytes(node: dict[str, Any]) -> int:
    for key in ("Size", "CacheSize", "BytesCaptured"):
        value = node.get(key)
        if value not in (None, ""):
            try:
                return int(value)
            except (TypeError, ValueError):
                continue
    return 0


def _total_bytes(record: dict[str, Any]) -> int:
    try:
        total = int(record.get("CacheSize") or 0)
    except (TypeError, ValueError):
        total = 0
    return total or sum(_node_bytes(n) for n in record.get("NodeSnapshots", []))


def snapshot_bytes(record: dict[str, Any]) -> int:
    """Exact bytes of a snapshot record (its total, or the sum of its shards so far)."""
    return _total_bytes(record)


def replication_group(record: dict[str, Any], arn: ArnBuilder) -> dict[str, Any]:
    """One ``ReplicationGroup`` as DescribeReplicationGroups returns it, extras under ``CacheVault``."""
    name = record["CacheName"]
    enabled = bool(record.get("ClusterMode"))
    out: dict[str, Any] = {
        "ReplicationGroupId": name,
        "Description": record.get("Description", f"cachevault {record.get('Managed', 'local')} cache"),
        "Status": record.get("Status"),
        "MemberClusters": sorted({f"{name}-{n.get('NodeGroupId')}" for n in record.get("Nodes", [])}),
        "NodeGroups": [_node_group(g, name) for g in record.get("NodeGroups", [])]
        or _node_groups_from_registry(record),
        "AutomaticFailover": "enabled" if enabled else "disabled",
        "SnapshotRetentionLimit": int(record.get("SnapshotRetentionLimit") or 0),
        "ClusterEnabled": enabled,
        "ClusterMode": cluster_mode(enabled),
        "CacheNodeType": record.get("CacheNodeType"),
        "Engine": record.get("Engine"),
        "TransitEncryptionEnabled": bool(record.get("TransitEncryptionEnabled")),
        "AuthTokenEnabled": bool(record.get("AuthSecretArn") or record.get("AuthParameterName")),
        "ARN": arn("replicationgroup", name),
        "DataTiering": record.get("DataTiering", "disabled"),
    }
    if record.get("SnapshotWindow"):
        out["SnapshotWindow"] = record["SnapshotWindow"]
    if record.get("CacheCreateTime"):
        out["ReplicationGroupCreateTime"] = record["CacheCreateTime"]
    skip = {"CacheName", "NodeGroups", "Status", "CacheNodeType", "Engine", "DataTiering", "ClusterMode"}
    skip |= {"SnapshotRetentionLimit", "SnapshotWindow", "CacheCreateTime", "TransitEncryptionEnabled"}
    out[EXTRAS] = {k: v for k, v in record.items() if k not in skip and v is not None}
    return out


def _endpoint(address: str) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    return {"Address": host, "Port": int(port)}


def _node_group(group: dict[str, Any], cache: str) -> dict[str, Any]:
    """From caches.describe_cache's live topology."""
    members = [
        {
            "CacheClusterId": f"{cache}-{group['NodeGroupId']}",
            "ReadEndpoint": _endpoint(group["Primary"]),
            "CurrentRole": "primary",
        }
    ]
    members += [
        {
            "CacheClusterId": f"{cache}-{group['NodeGroupId']}",
            "ReadEndpoint": _endpoint(r["Address"]),
            "CurrentRole": "replica",
        }
        for r in group.get("Replicas", [])
    ]
    out: dict[str, Any] = {
        "NodeGroupId": group["NodeGroupId"],
        "Status": "available",
        "PrimaryEndpoint": _endpoint(group["Primary"]),
        "NodeGroupMembers": members,
    }
    if group.get("Replicas"):
        out["ReaderEndpoint"] = _endpoint(group["Replicas"][0]["Address"])
    if group.get("Slots"):
        out["Slots"] = group["Slots"]
    out[EXTRAS] = {"Replicas": group.get("Replicas", [])}
    return out


def _node_groups_from_registry(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Without a live topology (``cache list``): the registry's nodes, grouped by shard."""
    groups: dict[str, dict[str, Any]] = {}
    for node in record.get("Nodes", []):
        gid = node.get("NodeGroupId", "0001")
        group = groups.setdefault(gid, {"NodeGroupId": gid, "Status": record.get("Status"), "NodeGroupMembers": []})
        member = {
            "CacheClusterId": f"{record['CacheName']}-{gid}",
            "CacheNodeId": node.get("CacheNodeId"),
            "ReadEndpoint": _endpoint(node["Address"]),
            "CurrentRole": node.get("Role"),
        }
        group["NodeGroupMembers"].append(member)
        if node.get("Role") == "primary":
            group["PrimaryEndpoint"] = _endpoint(node["Address"])
    return [groups[k] for k in sorted(groups)]
