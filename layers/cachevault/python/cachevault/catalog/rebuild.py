"""Rebuild the catalog's snapshot records from the snapshot bucket (the durable truth).

Every snapshot that reached ``available`` has ``snapshots/<name>/manifest.json`` next to its
RDBs (snapshot/steps.py ``write_manifest_step``; copies: ops/copy_steps.py ``complete_step``).
:func:`rebuild` reads each manifest and re-creates the record the catalog lost (DynamoDB
table emptied, restored from an old backup, a region's table recreated): status
``available``, ElastiCache's field names as the manifest has them. A record that exists is
kept as it is; a manifest that cannot be read, or whose RDB objects are missing or of another
size, is skipped with the reason. Idempotent: a second run adds nothing.
"""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError

from cachevault.catalog import snapshot_record, storage
from cachevault.catalog.records import Catalog
from cachevault.core.errors import SnapshotAlreadyExistsFault
from cachevault.core.timeutil import iso


def manifest_keys(s3: Any, bucket: str) -> list[str]:
    """``snapshots/<name>/manifest.json`` keys in the bucket, in name order."""
    keys = []
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=storage.SNAPSHOTS_PREFIX):
        for obj in page.get("Contents", []):
            parts = obj["Key"][len(storage.SNAPSHOTS_PREFIX) :].split("/")
            if len(parts) == 2 and parts[1] == storage.MANIFEST_NAME:
                keys.append(obj["Key"])
    return sorted(keys)


class Unusable(Exception):
    """A manifest that cannot become a record (the message says why)."""


def rebuild(catalog: Catalog, s3: Any, bucket: str) -> dict[str, Any]:
    """Add the records missing from the catalog; returns ``{"Added", "Kept", "Skipped"}``."""
    added: list[str] = []
    kept: list[str] = []
    skipped: list[dict[str, str]] = []
    for key in manifest_keys(s3, bucket):
        name = key[len(storage.SNAPSHOTS_PREFIX) :].split("/")[0]
        if catalog.find_snapshot(name) is not None:
            kept.append(name)
            continue
        try:
            record = record_from_manifest(_read(s3, bucket, key), bucket, key)
            _check_objects(s3, bucket, record)
        except Unusable as exc:
            skipped.append({"SnapshotName": name, "ManifestKey": key, "Reason": str(exc)})
            continue
        try:
            catalog.create_snapshot(record)
        except SnapshotAlreadyExistsFault:  # made meanwhile (a snapshot finishing now): keep it
            kept.append(name)
            continue
        added.append(name)
    return {"Bucket": bucket, "Added": added, "Kept": kept, "Skipped": skipped}


def _read(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        raise Unusable(f"cannot read s3://{bucket}/{key}: {exc.response.get('Error', {}).get('Code')}") from exc
    try:
        manifest = json.loads(body)
    except ValueError as exc:
        raise Unusable(f"s3://{bucket}/{key} is not JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise Unusable(f"s3://{bucket}/{key} is not a manifest (a JSON object)")
    return manifest


REQUIRED = ("SnapshotName", "ReplicationGroupId", "SnapshotCreateTime", "NodeSnapshots")
REQUIRED_NODE = ("NodeGroupId", "CacheNodeId", "S3Key", "CacheSize", "Sha256")


def record_from_manifest(manifest: dict[str, Any], bucket: str, key: str) -> dict[str, Any]:
    """The catalog record of an available snapshot, as write_manifest_step + mark_available_step leave it."""
    missing = [f for f in REQUIRED if not manifest.get(f)]
    if missing:
        raise Unusable(f"the manifest has no {', '.join(missing)}")
    name = str(manifest["SnapshotName"])
    if storage.manifest_key(name) != key:
        raise Unusable(f"the manifest names snapshot {name!r}, its key is {key}")
    if int(manifest.get("FormatVersion", 1)) != 1:
        raise Unusable(f"manifest FormatVersion {manifest.get('FormatVersion')} is not known here")
    nodes = []
    for node in manifest["NodeSnapshots"]:
        missing = [f for f in REQUIRED_NODE if node.get(f) in (None, "")]
        if missing:
            raise Unusable(f"shard {node.get('NodeGroupId')} of the manifest has no {', '.join(missing)}")
        size = int(node["CacheSize"])
        entry = {
            **node,
            "Size": size,
            "CacheSize": str(size),
            "CaptureStatus": "done",
            "SnapshotCreateTime": node.get("CaptureEndTime"),
        }
        if node.get("Slots"):
            entry["NodeGroupConfiguration"] = {"NodeGroupId": node["NodeGroupId"], "Slots": node["Slots"]}
        nodes.append(snapshot_record.record_entry(entry))
    cluster_mode = bool(manifest.get("ClusterMode"))
    record: dict[str, Any] = {
        "SnapshotName": name,
        "ReplicationGroupId": manifest["ReplicationGroupId"],
        "SnapshotStatus": "available",
        "SnapshotSource": manifest.get("SnapshotSource") or "manual",
        "CacheNodeType": manifest.get("CacheNodeType"),
        "Engine": manifest.get("Engine"),
        "EngineVersion": manifest.get("EngineVersion"),
        "ClusterMode": cluster_mode,
        "DataTiering": manifest.get("DataTiering", "disabled"),
        "NumNodeGroups": len(nodes),
        "SlotsPerNodeGroup": [n.get("Slots") for n in manifest["NodeSnapshots"]] if cluster_mode else None,
        "SnapshotCreateTime": manifest["SnapshotCreateTime"],
        "Bucket": bucket,
        "ManifestKey": key,
        "RdbVersion": manifest.get("RdbVersion"),
        "CacheSize": str(sum(int(n["Size"]) for n in nodes)),
        "CopiedFrom": manifest.get("CopiedFrom"),
        "NodeSnapshots": nodes,
        "Warnings": [],
        "RebuiltFromManifest": iso(),  # the record was lost and made again from the bucket
    }
    return {k: v for k, v in record.items() if v is not None}


def _check_objects(s3: Any, bucket: str, record: dict[str, Any]) -> None:
    """Each shard's RDB is in the bucket with the size the manifest names."""
    for node in record["NodeSnapshots"]:
        try:
            head = s3.head_object(Bucket=bucket, Key=node["S3Key"])
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            raise Unusable(
                f"shard {node['NodeGroupId']}: s3://{bucket}/{node['S3Key']} cannot be read ({code})"
            ) from exc
        if int(head["ContentLength"]) != int(node["Size"]):
            raise Unusable(
                f"shard {node['NodeGroupId']}: s3://{bucket}/{node['S3Key']} has {head['ContentLength']} bytes, "
                f"the manifest names {node['Size']}"
            )
