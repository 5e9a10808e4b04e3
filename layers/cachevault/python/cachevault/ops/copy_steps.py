"""The CopySnapshot state machine's steps (ElastiCache CopySnapshot, with and without TargetBucket).

Preflight -> Map(CopyObject per shard RDB) -> Complete; every step is caught to MarkFailed.

* Without a target bucket the copy is a new catalog snapshot TARGET: its own objects
  ``snapshots/TARGET/TARGET-0001.rdb`` ..., a manifest naming TARGET, SnapshotSource
  ``manual``, ``creating`` until every object is copied, then ``available``.
* With a target bucket the RDBs are exported to the user's bucket under ElastiCache's
  export names (``TARGET-0001.rdb`` ... at the bucket root). Refused before anything is
  written for snapshots of data tiering caches, a bucket outside the deployment's
  ExportBucketAllowList (``export_buckets``), a bucket that does not exist and a name that
  is already taken there.

The source snapshot is ``copying`` while the execution runs (so it can be neither
deleted nor restored meanwhile) and returns to ``available`` when it ends, failed or not.
Objects are copied server side (S3 CopyObject, or a managed multipart copy for large
objects: more than 5 GB cannot be copied in one request), never through this process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from cachevault.catalog import events, storage
from cachevault.catalog.progress_report import COPY, PartProgress
from cachevault.catalog.records import Catalog
from cachevault.core import encryption, export_buckets, names
from cachevault.core.aws import client
from cachevault.core.errors import (
    ChecksumMismatch,
    InvalidParameterCombination,
    InvalidParameterValue,
    InvalidSnapshotState,
    SnapshotAlreadyExistsFault,
)
from cachevault.core.failures import caught_failure, cleanup
from cachevault.core.handler import logger, metrics
from cachevault.core.settings import Settings
from cachevault.core.timeutil import iso

MiB = 1 << 20
# Below this an object is copied with one CopyObject (S3 allows up to 5 GB); above it
# boto3's managed copy issues UploadPartCopy requests in parallel, all server side.
MULTIPART_THRESHOLD = 512 * MiB
MULTIPART_CHUNK = 512 * MiB  # 10,000 parts * 512 MiB = 5 TiB, S3's object size limit
COPY_CONCURRENCY = 8
DATA_TIERING_NODE_FAMILY = "r6gd"
# What a source record loses when its copy ends (set by preflight_step).
RELEASED: dict[str, Any] = {"CopyExecution": None, "CopyTarget": None, "CopyTargetBucket": None}


def export_key(target: str, index: int) -> str:
    """ElastiCache's export object name: ``<TargetSnapshotName>-0001.rdb`` at the bucket root."""
    storage.check_snapshot_name(target)
    if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= 9999:
        raise InvalidParameterValue(f"shard index {index!r} must be 1..9999")
    return f"{target}-{index:04d}.rdb"


def copy_object(
    s3: Any,
    source_bucket: str,
    source_key: str,
    target_bucket: str,
    target_key: str,
    *,
    multipart_threshold: int = MULTIPART_THRESHOLD,
    multipart_chunk: int = MULTIPART_CHUNK,
    target_owner: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Server-side copy (managed multipart above the threshold); returns the target's head.

    ``target_owner`` (``{"ExpectedBucketOwner": account}``) goes with every request on the target;
    ``on_bytes(n)`` is boto3's transfer callback: the bytes copied since its last call.
    """
    owner = target_owner or {}
    config = TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=multipart_chunk,
        max_concurrency=COPY_CONCURRENCY,
        use_threads=True,
    )
    s3.copy(
        {"Bucket": source_bucket, "Key": storage.check_key(source_key)},
        target_bucket,
        storage.check_key(target_key),
        ExtraArgs={**encryption.s3_args(), **owner},  # encrypted like every object cachevault writes
        Config=config,
        Callback=on_bytes,
    )
    return s3.head_object(Bucket=target_bucket, Key=target_key, **owner)


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


# ---------------------------------------------------------------------------------- preflight
def preflight_step(event: dict[str, Any]) -> dict[str, Any]:
    """Every refusal happens here, before anything is written; then mark the source copying."""
    request = event.get("Request", event)
    execution = event.get("ExecutionName", "")
    settings = Settings.from_env()
    catalog = Catalog(settings)
    source_name = names.snapshot_name(request.get("SourceSnapshotName", ""), automatic=True)
    # A copy is a manual snapshot: the automatic. prefix stays reserved (as in ElastiCache).
    target = names.snapshot_name(request.get("TargetSnapshotName", ""))
    target_bucket = (request.get("TargetBucket") or "").strip() or None
    if target_bucket:
        storage.check_bucket_name(target_bucket)
    source = catalog.get_snapshot(source_name)
    if source["SnapshotStatus"] != "available":
        raise InvalidSnapshotState(
            f"Snapshot {source_name!r} is {source['SnapshotStatus']!r}; only an available snapshot can be copied."
        )
    source_bucket = source.get("Bucket", settings.bucket)
    nodes = sorted(source.get("NodeSnapshots", []), key=lambda n: n["NodeGroupId"])
    if not nodes:
        raise InvalidSnapshotState(f"Snapshot {source_name!r} has no node snapshots to copy.")
    s3 = client("s3")
    if target_bucket:
        _check_export(s3, source, target, target_bucket, len(nodes))
        target_keys = [export_key(target, i) for i in range(1, len(nodes) + 1)]
    else:
        if target == source_name or catalog.find_snapshot(target) is not None:
            raise SnapshotAlreadyExistsFault(f"Snapshot {target!r} already exists.")
        target_keys = [storage.rdb_key(target, i) for i in range(1, len(nodes) + 1)]

    # Accepted: from here on MarkFailed undoes what this execution did (it knows by name).
    # The target is named on the source too: a recovery whose execution is gone still knows
    # what to undo (ops/recovery.py).
    catalog.update_snapshot(
        source_name,
        expect_status="available",
        SnapshotStatus="copying",
        CopyExecution=execution,
        CopyTarget=target,
        CopyTargetBucket=target_bucket,
    )
    if not target_bucket:
        try:
            catalog.create_snapshot(_target_record(source, target, target_keys, settings.bucket, execution))
        except Exception:
            catalog.update_snapshot(source_name, SnapshotStatus="available", **RELEASED)
            raise
    objects = [
        {
            "Index": i,
            "NodeGroupId": node["NodeGroupId"],
            "SourceKey": node["S3Key"],
            "TargetKey": key,
            "Size": int(node.get("Size") or node.get("CacheSize") or 0),
            "Sha256": node.get("Sha256"),
        }
        for i, (node, key) in enumerate(zip(nodes, target_keys, strict=True), start=1)
    ]
    logger.info("copy accepted", source=source_name, target=target, bucket=target_bucket, objects=len(objects))
    return {
        "SourceSnapshotName": source_name,
        "TargetSnapshotName": target,
        "TargetBucket": target_bucket,
        "Mode": "export" if target_bucket else "copy",
        "SourceBucket": source_bucket,
        "DestinationBucket": target_bucket or settings.bucket,
        "Objects": objects,
        "ExecutionName": execution,
    }


def _check_export(s3: Any, source: dict[str, Any], target: str, bucket: str, count: int) -> None:
    tiering = source.get("DataTiering") == "enabled" or DATA_TIERING_NODE_FAMILY in str(source.get("CacheNodeType"))
    if tiering:
        raise InvalidParameterCombination(
            f"Snapshot {source['SnapshotName']!r} is of a data tiering cache ({source.get('CacheNodeType')}); "
            "exporting snapshots of data tiering caches to Amazon S3 is not supported."
        )
    export_buckets.check_allowed(bucket)
    owner = export_buckets.owner_args()
    try:
        s3.head_bucket(Bucket=bucket, **owner)
    except ClientError as err:
        raise InvalidParameterValue(
            f"The S3 bucket {bucket!r} does not exist or cannot be accessed ({_error_code(err)}); "
            "create it in this region before exporting to it."
        ) from err
    for index in range(1, count + 1):
        key = export_key(target, index)
        try:
            s3.head_object(Bucket=bucket, Key=key, **owner)
        except ClientError as err:
            if _error_code(err) in ("404", "NoSuchKey", "NotFound"):
                continue
            raise
        raise InvalidParameterValue(
            f"An object named {key!r} already exists in the S3 bucket {bucket!r}; exporting snapshot "
            f"{source['SnapshotName']!r} as {target!r} would overwrite it. Choose another target name."
        )


def _target_record(source: dict[str, Any], target: str, keys: list[str], bucket: str, execution: str) -> dict[str, Any]:
    nodes = sorted(source.get("NodeSnapshots", []), key=lambda n: n["NodeGroupId"])
    copied = [{**node, "S3Key": key} for node, key in zip(nodes, keys, strict=True)]
    skip = {
        "SnapshotName",
        "SnapshotStatus",
        "SnapshotSource",
        "ExecutionName",
        "Bucket",
        "ManifestKey",
        "NodeSnapshots",
        "CopyExecution",
        "CopyTarget",
        "CopyTargetBucket",
        "FinalSnapshot",
        "FailureReason",
        "FailedAt",
        "Warnings",
    }
    record = {k: v for k, v in source.items() if k not in skip}
    record.update(
        {
            "SnapshotName": target,
            "SnapshotStatus": "creating",
            "SnapshotSource": "manual",  # ElastiCache: a copy is always a manual snapshot
            "CopiedFrom": source["SnapshotName"],
            "CopyCreateTime": iso(),
            "ExecutionName": execution,
            "Bucket": bucket,
            "NodeSnapshots": copied,
        }
    )
    return record


# ---------------------------------------------------------------------------------- copy
def copy_object_step(event: dict[str, Any]) -> dict[str, Any]:
    """Copy one shard's RDB server side; the copy must have the size the manifest names."""
    obj = event["Object"]
    s3 = client("s3")
    report = PartProgress(
        Catalog(Settings.from_env()),
        COPY,
        event.get("TargetSnapshotName") or obj["TargetKey"],
        f"copy-{int(obj['Index']):04d}",
        phase="copy",
        total=int(obj["Size"]) if obj.get("Size") else None,
    )
    copied = 0

    def on_bytes(n: int) -> None:
        nonlocal copied
        copied += n
        report.update(copied)

    owner = export_buckets.owner_args() if event.get("TargetBucket") else {}
    report.start()
    try:
        source, target = (event["SourceBucket"], obj["SourceKey"]), (event["DestinationBucket"], obj["TargetKey"])
        head = copy_object(s3, *source, *target, target_owner=owner, on_bytes=on_bytes)
    except ClientError as err:
        if _error_code(err) not in ("404", "NoSuchKey", "NotFound"):
            raise
        # boto3's managed copy reads the source's size first: a 404 here is the source object.
        raise InvalidSnapshotState(
            f"The snapshot's object s3://{event['SourceBucket']}/{obj['SourceKey']} no longer exists; "
            "the snapshot cannot be copied (delete it, or take a new one)."
        ) from err
    size = int(head["ContentLength"])
    if obj.get("Size") and size != int(obj["Size"]):
        raise ChecksumMismatch(
            f"s3://{event['DestinationBucket']}/{obj['TargetKey']} has {size} bytes; the snapshot's "
            f"{obj['SourceKey']} has {obj['Size']}."
        )
    report.finish(size)
    metrics.add_metric(name="BytesCopied", unit="Bytes", value=size)
    return {"Index": obj["Index"], "TargetKey": obj["TargetKey"], "Size": size, "ETag": head["ETag"]}


# ---------------------------------------------------------------------------------- finish
def complete_step(event: dict[str, Any]) -> dict[str, Any]:
    settings = Settings.from_env()
    catalog = Catalog(settings)
    source_name, target = event["SourceSnapshotName"], event["TargetSnapshotName"]
    source = catalog.get_snapshot(source_name)
    results = sorted(event.get("CopyResults") or [], key=lambda r: r["Index"])
    total = sum(int(r["Size"]) for r in results)
    if event["Mode"] == "copy":
        s3 = client("s3")
        manifest = storage.read_manifest(s3, event["SourceBucket"], source_name)
        storage.write_manifest(s3, settings.bucket, target, _target_manifest(manifest, target, event["Objects"]))
        catalog.update_snapshot(
            target,
            expect_status="creating",
            SnapshotStatus="available",
            ManifestKey=storage.manifest_key(target),
            CacheSize=str(total),
        )
    catalog.update_snapshot(source_name, expect_status="copying", SnapshotStatus="available", **RELEASED)
    catalog.delete_operation_progress(COPY, target)  # the CLI reads it only while copying
    detail_type = events.SNAPSHOT_COPY_COMPLETED if event["Mode"] == "copy" else events.SNAPSHOT_EXPORT_COMPLETED
    events.snapshot_status(
        detail_type,
        source,
        SnapshotStatus="available",
        TargetSnapshotName=target,
        TargetBucket=event.get("TargetBucket"),
        Objects=[r["TargetKey"] for r in results],
        CacheSize=str(total),
    )
    metrics.add_metric(name="SnapshotsCopied", unit="Count", value=1)
    logger.info("copy complete", source=source_name, target=target, mode=event["Mode"], bytes=total)
    return {
        "SourceSnapshotName": source_name,
        "TargetSnapshotName": target,
        "TargetBucket": event.get("TargetBucket"),
        "Mode": event["Mode"],
        "SnapshotStatus": "available",
        "Objects": [{"Key": r["TargetKey"], "Size": r["Size"], "ETag": r["ETag"]} for r in results],
        "CacheSize": total,
    }


def _target_manifest(manifest: dict[str, Any], target: str, objects: list[dict[str, Any]]) -> dict[str, Any]:
    by_group = {o["NodeGroupId"]: o["TargetKey"] for o in objects}
    nodes = [{**n, "S3Key": by_group[n["NodeGroupId"]]} for n in manifest["NodeSnapshots"]]
    return {
        **manifest,
        "SnapshotName": target,
        "SnapshotSource": "manual",
        "CopiedFrom": manifest["SnapshotName"],
        "NodeSnapshots": nodes,
    }


def mark_failed_step(event: dict[str, Any]) -> dict[str, Any]:
    """Undo only what this execution did: its objects, its target record; free the source.

    Never raises for what is already gone (the target bucket or objects, the target or
    source record, the multipart uploads); the source goes back to ``available`` whatever
    else failed (other errors are reported in ``CleanupErrors``).
    """
    _state, execution, request, reason = caught_failure(event)
    settings = Settings.from_env()
    catalog = Catalog(settings)
    errors: list[str] = []
    source_name = str(request.get("SourceSnapshotName", "")).lower()
    target = str(request.get("TargetSnapshotName", "")).lower()
    target_bucket = (request.get("TargetBucket") or "").strip() or None
    source = None
    if source_name:
        source = cleanup("read the source record", lambda: catalog.find_snapshot(source_name), errors)
    ours = bool(execution and source and source.get("CopyExecution") == execution)
    if ours and source is not None:
        s3 = client("s3")
        if target_bucket:
            # Preflight proved none of these names existed: whatever is there now is ours.
            count = len(source.get("NodeSnapshots", []))
            keys = [{"Key": export_key(target, i)} for i in range(1, count + 1)]
            if keys:
                cleanup(
                    "delete the exported objects",
                    lambda: s3.delete_objects(
                        Bucket=target_bucket, Delete={"Objects": keys, "Quiet": True}, **export_buckets.owner_args()
                    ),
                    errors,
                )
        else:
            record = cleanup("read the target record", lambda: catalog.find_snapshot(target), errors)
            if record is not None and record.get("ExecutionName") == execution:
                prefix = storage.snapshot_prefix(target)
                cleanup(
                    "abort the multipart uploads",
                    lambda: storage.abort_incomplete_uploads(s3, settings.bucket, prefix),
                    errors,
                )
                cleanup("delete the target objects", lambda: storage.delete_prefix(s3, settings.bucket, prefix), errors)
                failed = {"SnapshotStatus": "failed", "FailureReason": reason, "FailedAt": iso()}
                cleanup("mark the target failed", lambda: catalog.update_snapshot(target, **failed), errors)
        cleanup("delete the copy progress", lambda: catalog.delete_operation_progress(COPY, target), errors)
        cleanup(
            "hand the source back",
            lambda: catalog.update_snapshot(source_name, SnapshotStatus="available", **RELEASED),
            errors,
        )
        detail_type = events.SNAPSHOT_EXPORT_FAILED if target_bucket else events.SNAPSHOT_COPY_FAILED
        cleanup(
            "publish the failure event",
            lambda: events.snapshot_status(
                detail_type,
                source,
                SnapshotStatus="available",
                TargetSnapshotName=target,
                TargetBucket=target_bucket,
                FailureReason=reason,
            ),
            errors,
        )
        metrics.add_metric(name="SnapshotCopyFailures", unit="Count", value=1)
    logger.error("copy failed", source=source_name, target=target, reason=reason, accepted=ours, cleanup_errors=errors)
    return {
        "SourceSnapshotName": source_name,
        "TargetSnapshotName": target,
        "FailureReason": reason,
        **({"CleanupErrors": errors} if errors else {}),
    }
