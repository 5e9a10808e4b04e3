"""The CreateSnapshot state machine's steps, one function per Task state.

Each step takes the state's JSON and returns the next state's JSON; handlers under
``functions/`` only wrap these. The catalog record is the source of truth a user
watches (``snapshot describe``): every step moves it forward, MarkFailed moves it to
``failed`` and removes what a failed snapshot left behind.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cachevault.catalog import events, snapshot_record, storage
from cachevault.catalog.records import Catalog
from cachevault.core import encryption, names, polling
from cachevault.core.aws import client
from cachevault.core.errors import CaptureFailed, InvalidParameterValue
from cachevault.core.failures import caught_failure, cleanup
from cachevault.core.handler import logger, metrics, record_duration
from cachevault.core.settings import Settings
from cachevault.core.timeutil import iso
from cachevault.nodes import credentials as creds_mod
from cachevault.nodes import restore_targets, topology
from cachevault.nodes.slots import format_slot_ranges
from cachevault.snapshot import capture_runner, preflight

DEFAULT_POLL_SECONDS = 2
# A capture whose heartbeat is older than this is dead (its worker crashed, hung or was killed).
HEARTBEAT_TIMEOUT_S = 120


def heartbeat_timeout() -> float:
    return float(os.environ.get("CAPTURE_HEARTBEAT_TIMEOUT_SECONDS") or HEARTBEAT_TIMEOUT_S)


def _catalog() -> Catalog:
    return Catalog(Settings.from_env())


def node_address(node: Any) -> str:
    return f"{node.host}:{node.port}"


def cache_node_id(cache: dict[str, Any], address: str) -> str:
    """ElastiCache-style CacheNodeId of a node (the registry knows it; else its address)."""
    for node in cache.get("Nodes", []):
        if node.get("Address") == address:
            return node["CacheNodeId"]
    return address


def _resolve_source_node(cache: dict[str, Any], wanted: str | None) -> str | None:
    if not wanted:
        return None
    for node in cache.get("Nodes", []):
        if wanted.lower() in (node["CacheNodeId"].lower(), node.get("Address")):
            return node["Address"]
    if ":" in wanted:
        return wanted
    raise InvalidParameterValue(
        f"Source node {wanted!r} is not a node of replication group {cache['CacheName']!r}."
    )


# ---------------------------------------------------------------------------------- steps
def preflight_step(event: dict[str, Any]) -> dict[str, Any]:
    """Check every constraint, then create the record (``creating``) and take the lock."""
    request = event.get("Request", event)
    execution = event.get("ExecutionName", "")
    source = request.get("SnapshotSource", "manual")
    if source not in ("manual", "automated"):
        raise InvalidParameterValue(f"SnapshotSource must be manual or automated, not {source!r}.")
    snapshot = names.snapshot_name(request.get("SnapshotName", ""), automatic=source == "automated")
    cache_name = names.cache_name(request.get("ReplicationGroupId", ""))
    settings = Settings.from_env()
    catalog = Catalog(settings)
    cache = catalog.get_cache(cache_name)
    req = preflight.SnapshotRequest(
        snapshot_name=snapshot,
        cache_name=cache_name,
        source=source,
        source_node=request.get("SourceNode"),
        final=bool(request.get("FinalSnapshot")),
    )
    ctx = preflight.PreflightContext(
        request=req,
        cache=cache,
        catalog=catalog,
        reserved_memory_percent=settings.reserved_memory_percent,
    )
    # Rules that need no node I/O first, so a bad request costs nothing.
    serverless = cache.get("Kind") == "serverless"
    for rule in preflight.RULES:
        # The per-node quota and the memory check need the nodes the snapshot will read:
        # discover them once, when the first rule needing them comes.
        needs_nodes = rule is preflight.memory_headroom or (rule is preflight.within_quota and not serverless)
        if needs_nodes and not ctx.source_nodes:
            _predict_sources(ctx)
        rule(ctx)
    for warning in ctx.warnings:
        logger.warning(warning, snapshot=snapshot)
    catalog.lock_cache(cache_name, owner=snapshot, operation="snapshot")
    try:
        # Again under the lock: a snapshot that ran between the check above and the lock
        # counts now (only the lock holder adds records; its record was written when it
        # started, so even an eventually consistent ByCache index has it by now).
        preflight.within_quota(ctx)
        catalog.create_snapshot(
            {
                "SnapshotName": snapshot,
                "ReplicationGroupId": cache_name,
                "SnapshotStatus": "creating",
                "SnapshotSource": source,
                "CacheNodeType": cache.get("CacheNodeType"),
                "Engine": cache.get("Engine"),
                "EngineVersion": cache.get("EngineVersion"),
                "ClusterMode": bool(cache.get("ClusterMode")),
                "DataTiering": cache.get("DataTiering", "disabled"),
                "NumNodeGroups": cache.get("NumNodeGroups", 1),
                "SnapshotCreateTime": iso(),
                "FinalSnapshot": req.final,
                "ExecutionName": execution,
                "Warnings": ctx.warnings,
                "Bucket": settings.bucket,
                "NodeSnapshots": [],
            }
        )
    except Exception:
        catalog.unlock_cache(cache_name, owner=snapshot)
        raise
    return {
        "SnapshotName": snapshot,
        "ReplicationGroupId": cache_name,
        "SnapshotSource": source,
        "SourceNode": request.get("SourceNode"),
        "FinalSnapshot": req.final,
        "PollSeconds": int(request.get("PollSeconds") or DEFAULT_POLL_SECONDS),
        "ExecutionName": execution,
        "Warnings": ctx.warnings,
    }


def _predict_sources(ctx: preflight.PreflightContext) -> None:
    """The node each shard's capture will read (as SelectSources will pick it) and its memory."""
    cache, req = ctx.cache, ctx.request
    credentials = creds_mod.for_cache(cache)  # resolved per step: never in the payload
    topo = topology.discover(topology.seed_endpoints(cache), credentials=credentials)
    prefer = _resolve_source_node(cache, req.source_node)
    quota_used = _quota_used(ctx.catalog, cache, req)
    for pick in pick_sources(topo, cache, prefer=prefer, final=req.final, quota_used=quota_used):
        node_id = cache_node_id(cache, node_address(pick.node))
        ctx.source_nodes.append(node_id)
        ctx.node_memory[node_id] = topology.node_memory(pick.node.host, pick.node.port, credentials=credentials)
        if pick.warning and pick.warning not in ctx.warnings:
            ctx.warnings.append(pick.warning)


def _quota_used(catalog: Catalog, cache: dict[str, Any], req: preflight.SnapshotRequest) -> Counter[str] | None:
    """Per-node counts of the manual quota, when this snapshot counts against it."""
    if req.source != "manual" or cache.get("Kind") == "serverless":
        return None
    return preflight.manual_snapshots_per_node(catalog, cache["CacheName"])


def _replicas_of(cache: dict[str, Any], shard: Any) -> list[str]:
    """The shard's replicas: those the topology shows, and the registry's (a dead node drops out of INFO)."""
    found = [cache_node_id(cache, node_address(r)) for r in shard.replicas]
    primary = node_address(shard.primary)
    group = next((n.get("NodeGroupId") for n in cache.get("Nodes", []) if n.get("Address") == primary), None)
    for node in cache.get("Nodes", []):
        same_shard = group and node.get("NodeGroupId") == group and node.get("Address") != primary
        if same_shard and node["CacheNodeId"] not in found:
            found.append(node["CacheNodeId"])
    return found


@dataclass(frozen=True)
class SourcePick:
    shard: Any
    node: Any
    warning: str | None = None


def pick_sources(
    topo: Any,
    cache: dict[str, Any],
    *,
    prefer: str | None,
    final: bool,
    quota_used: Counter[str] | None = None,
) -> list[SourcePick]:
    """Each shard's source, as ElastiCache picks it.

    The named node; the primary for a final snapshot; else the healthiest replica that has
    not used its 20 manual snapshots of the last 24 h (the next healthy one if it has).
    The primary is read only when named or when the shard has no healthy replica, and
    then with a warning the snapshot record keeps: its fork costs the writers latency.
    """

    def exhausted(node: Any) -> bool:
        used = quota_used.get(cache_node_id(cache, node_address(node)), 0) if quota_used else 0
        return used >= preflight.MANUAL_QUOTA_NODE_BASED

    picks = []
    for shard in topo.shards:
        warning = None
        if prefer and not topo.cluster_mode:
            node = topology.choose_source(shard, prefer_node=prefer, allow_primary=True)
            if node is shard.primary:
                warning = (
                    f"Shard {shard.shard_id}: the snapshot is taken from the primary "
                    f"{cache_node_id(cache, node_address(node))}, as asked (SourceNode); its fork can add "
                    "latency for writers while it runs."
                )
        elif final:
            node = shard.primary  # ElastiCache takes a final snapshot from the primary
        else:
            node = topology.choose_source(shard, allow_primary=True, exhausted=exhausted)
            if node is shard.primary:
                down = _replicas_of(cache, shard)
                why = f"replicas down or unreachable: {', '.join(down)}" if down else "the shard has no replica"
                warning = (
                    f"Shard {shard.shard_id}: no healthy replica ({why}), so the snapshot is taken "
                    f"from the primary {cache_node_id(cache, node_address(node))}; its fork can add latency "
                    "for writers while it runs."
                )
        picks.append(SourcePick(shard, node, warning))
    return picks


def select_sources_step(event: dict[str, Any]) -> dict[str, Any]:
    """Re-read the topology now and pick each shard's source node."""
    catalog = _catalog()
    cache = catalog.get_cache(event["ReplicationGroupId"])
    creds = creds_mod.for_cache(cache)
    topo = topology.discover(topology.seed_endpoints(cache), credentials=creds)
    prefer = _resolve_source_node(cache, event.get("SourceNode"))
    shards, node_snapshots = [], []
    request = preflight.SnapshotRequest(
        snapshot_name=event["SnapshotName"],
        cache_name=cache["CacheName"],
        source=event.get("SnapshotSource", "manual"),
        final=bool(event.get("FinalSnapshot")),
    )
    picks = pick_sources(
        topo, cache, prefer=prefer, final=request.final, quota_used=_quota_used(catalog, cache, request)
    )
    warnings = list(catalog.get_snapshot(event["SnapshotName"]).get("Warnings") or [])
    for pick in picks:
        if pick.warning and pick.warning not in warnings:
            warnings.append(pick.warning)  # the topology changed since preflight: the record says so
            logger.warning(pick.warning, snapshot=event["SnapshotName"])
    for index, pick in enumerate(picks, start=1):
        shard, node = pick.shard, pick.node
        address = node_address(node)
        slots = format_slot_ranges(shard.slots) if topo.cluster_mode else None
        group_id = f"{index:04d}"
        shard = {
            "ShardIndex": index,
            "NodeGroupId": group_id,
            "Slots": slots,
            "Host": node.host,
            "Port": node.port,
            "CacheNodeId": cache_node_id(cache, address),
            "Role": node.role,
            "ReplicationGroupId": cache["CacheName"],
        }
        # Inline in StartCapture or an ECS task: the Map's Choice reads Runner.
        shards.append(shard | capture_runner.plan(shard, creds))
        entry: dict[str, Any] = {
            "NodeGroupId": group_id,
            "CacheNodeId": cache_node_id(cache, address),
            "SourceRole": node.role,
            "CaptureStatus": "pending",
            "S3Key": storage.rdb_key(event["SnapshotName"], index),
        }
        if slots:
            entry["NodeGroupConfiguration"] = {"NodeGroupId": group_id, "Slots": slots}
        node_snapshots.append(entry)
    catalog.update_snapshot(
        event["SnapshotName"],
        NodeSnapshots=node_snapshots,
        NumNodeGroups=len(shards),
        SlotsPerNodeGroup=[s["Slots"] for s in shards] if topo.cluster_mode else None,
        Warnings=warnings,
    )
    logger.info("sources selected", snapshot=event["SnapshotName"], shards=shards)
    return {**event, "Shards": shards, "Warnings": warnings}


def start_capture_step(event: dict[str, Any]) -> dict[str, Any]:
    """The inline runner: the whole capture inside this invocation (planned to fit well in it),
    then FinishShard's check of the object, so the shard's branch ends here: no Wait, no poll,
    and no other Lambda environment to start (each cold one cost 0.3 s of a 1 GB capture's 15.6 s).
    """
    started = time.time()
    capture_runner.run_inline(event["SnapshotName"], event["Shard"], Settings.from_env())
    polled = poll_capture_step({**event, "Capture": {"Done": False, "StartedAtEpoch": started}})  # raises if failed
    if not polled["Capture"]["Done"]:
        shard = event["Shard"]["NodeGroupId"]
        raise CaptureFailed(f"Capture of shard {shard} returned without a result ({polled['Capture']['Status']}).")
    return finish_shard_step(event)


def _poll_base(event: dict[str, Any]) -> int:
    return int(event.get("PollSeconds") or DEFAULT_POLL_SECONDS)


def _started_epoch(capture: dict[str, Any]) -> float | None:
    """When the capture started: StartCapture's epoch, or the ISO time StartCaptureTask's Pass records."""
    if capture.get("StartedAtEpoch") is not None:
        return float(capture["StartedAtEpoch"])
    if capture.get("StartedAt"):
        return datetime.fromisoformat(str(capture["StartedAt"]).replace("Z", "+00:00")).timestamp()
    return None


def poll_capture_step(event: dict[str, Any]) -> dict[str, Any]:
    shard = event["Shard"]
    node = _catalog().capture_progress(event["SnapshotName"]).get(shard["NodeGroupId"], {})
    status = node.get("CaptureStatus", "pending")
    if status == "failed":
        raise CaptureFailed(
            f"Capture of shard {shard['NodeGroupId']} from {shard['CacheNodeId']} failed: "
            f"{node.get('CaptureError', 'unknown error')}"
        )
    task_arn = next(iter((event.get("CaptureTask") or {}).get("TaskArns") or []), None)  # ecs:runTask's one task
    timeout = heartbeat_timeout()
    if status == "running" and time.time() - float(node.get("Heartbeat", time.time())) > timeout:
        if task_arn:  # a hung worker must not go on streaming into an upload MarkFailed aborts
            restore_targets.stop_tasks([task_arn], "capture heartbeat stalled")
        raise CaptureFailed(
            f"Capture of shard {shard['NodeGroupId']} stopped reporting progress for over "
            f"{timeout:.0f} s; its worker is gone{' (task ' + task_arn + ' stopped)' if task_arn else ''}."
        )
    if task_arn and status != "done":
        task = capture_runner.task_state(task_arn)
        if task["lastStatus"] == "STOPPED":
            # Re-read: the worker may have written "done" just before it exited.
            node = _catalog().capture_progress(event["SnapshotName"]).get(shard["NodeGroupId"], {})
            status = node.get("CaptureStatus", "pending")
            if status != "done":
                raise CaptureFailed(
                    f"Capture task of shard {shard['NodeGroupId']} stopped ({task['stoppedReason']}, exit codes "
                    f"{task['exitCodes']}): {node.get('CaptureError', 'no capture result recorded')}"
                )
    started = _started_epoch(event.get("Capture") or {})
    return {
        **event,
        "Capture": {
            "Done": status == "done",
            "Status": status,
            "BytesCaptured": node.get("BytesCaptured", 0),
            "RateBytesPerSecond": node.get("RateBytesPerSecond", 0),
            "StartedAtEpoch": started,
            "NextPollSeconds": polling.next_poll_seconds(started, _poll_base(event)),
        },
    }


def finish_shard_step(event: dict[str, Any]) -> dict[str, Any]:
    """The shard's object must exist with the size the capture counted."""
    shard = event["Shard"]
    settings = Settings.from_env()
    node = Catalog(settings).capture_progress(event["SnapshotName"])[shard["NodeGroupId"]]
    key = storage.rdb_key(event["SnapshotName"], shard["ShardIndex"])
    head = client("s3").head_object(Bucket=settings.bucket, Key=key)
    if int(head["ContentLength"]) != int(node["Size"]):
        raise CaptureFailed(
            f"Shard {shard['NodeGroupId']}: object {key} has {head['ContentLength']} bytes, "
            f"the capture sent {node['Size']}."
        )
    metrics.add_metric(name="BytesCaptured", unit="Bytes", value=int(node["Size"]))
    metrics.add_metric(name="CaptureDuration", unit="Seconds", value=float(node.get("CaptureSeconds", 0)))
    # Small on purpose: the Map gathers one per shard into a single payload (256 KB at 500
    # shards); WriteManifest reads the full results from the progress table.
    return {"NodeGroupId": shard["NodeGroupId"], "Size": int(node["Size"])}


# What a finished capture contributes to its NodeSnapshots entry (ElastiCache names first).
_CAPTURE_FIELDS = (
    "Size",
    "Sha256",
    "RdbVersion",
    "KeyCount",
    "KeysPerDb",
    "ExpiresPerDb",
    "KeyCountExact",
    "Functions",
    "ModuleKeysSkipped",
    "Modules",
    "ReplicationId",
    "ReplicationOffset",
    "CaptureStartTime",
    "CaptureEndTime",
    "CaptureSeconds",
    "CaptureMode",
)


def write_manifest_step(event: dict[str, Any]) -> dict[str, Any]:
    """Fold each shard's capture result into NodeSnapshots, then write manifest.json."""
    settings = Settings.from_env()
    catalog = Catalog(settings)
    record = catalog.get_snapshot(event["SnapshotName"])
    progress = catalog.capture_progress(record["SnapshotName"])
    for node in record["NodeSnapshots"]:
        result = progress[node["NodeGroupId"]]
        node.update({k: result[k] for k in _CAPTURE_FIELDS if k in result})
        node["CacheSize"] = str(result["Size"])
        node["SnapshotCreateTime"] = result.get("CaptureEndTime")
        node["CaptureStatus"] = "done"
    cache = catalog.get_cache(record["ReplicationGroupId"])
    manifest = build_manifest(record, cache)
    storage.write_manifest(
        client("s3"), settings.bucket, record["SnapshotName"], manifest, extra_args=encryption.s3_args()
    )
    catalog.update_snapshot(
        record["SnapshotName"],
        # The capture's details stay in the manifest: the record of 500 shards fits 400 KB.
        NodeSnapshots=[snapshot_record.record_entry(n) for n in record["NodeSnapshots"]],
        ManifestKey=storage.manifest_key(record["SnapshotName"]),
        RdbVersion=manifest["RdbVersion"],
    )
    catalog.delete_capture_progress(record["SnapshotName"])
    return {**event, "ManifestKey": storage.manifest_key(record["SnapshotName"])}


def build_manifest(record: dict[str, Any], cache: dict[str, Any]) -> dict[str, Any]:
    nodes = record["NodeSnapshots"]
    return {
        "FormatVersion": 1,
        "SnapshotName": record["SnapshotName"],
        "SnapshotSource": record["SnapshotSource"],
        "SnapshotCreateTime": record["SnapshotCreateTime"],
        "ReplicationGroupId": record["ReplicationGroupId"],
        "Engine": cache.get("Engine"),
        "EngineVersion": cache.get("EngineVersion"),
        "RdbVersion": max(int(n.get("RdbVersion", 0)) for n in nodes),
        "CacheNodeType": cache.get("CacheNodeType"),
        "ClusterMode": bool(cache.get("ClusterMode")),
        "DataTiering": cache.get("DataTiering", "disabled"),
        "NumNodeGroups": len(nodes),
        "Parameters": cache.get("Parameters", {}),
        "NodeSnapshots": [
            {
                "NodeGroupId": n["NodeGroupId"],
                "Slots": (n.get("NodeGroupConfiguration") or {}).get("Slots"),
                "CacheNodeId": n["CacheNodeId"],
                "SourceRole": n.get("SourceRole"),
                "S3Key": n["S3Key"],
                "CacheSize": int(n["Size"]),
                "Sha256": n["Sha256"],
                "RdbVersion": n.get("RdbVersion"),
                "KeyCount": n.get("KeyCount"),
                "KeysPerDb": n.get("KeysPerDb", {}),
                # What a restore decides on without reading the RDB (restore_workflow._manifest_source):
                # the databases and counts, exact only when counted from the RDB itself.
                "ExpiresPerDb": n.get("ExpiresPerDb", {}),
                "KeyCountExact": bool(n.get("KeyCountExact")),
                "Functions": n.get("Functions"),
                "ModuleKeysSkipped": n.get("ModuleKeysSkipped"),
                # Modules the source node had loaded (None: not recorded): none, no module values.
                "Modules": n.get("Modules"),
                "ReplicationId": n.get("ReplicationId"),
                "ReplicationOffset": n.get("ReplicationOffset"),
                "CaptureStartTime": n.get("CaptureStartTime"),
                "CaptureEndTime": n.get("CaptureEndTime"),
            }
            for n in nodes
        ],
    }


def mark_available_step(event: dict[str, Any]) -> dict[str, Any]:
    catalog = _catalog()
    record = catalog.get_snapshot(event["SnapshotName"])
    total = sum(int(n.get("Size", 0)) for n in record["NodeSnapshots"])
    catalog.update_snapshot(
        event["SnapshotName"], expect_status="creating", SnapshotStatus="available", CacheSize=str(total)
    )
    catalog.unlock_cache(record["ReplicationGroupId"], owner=event["SnapshotName"])
    metrics.add_metric(name="SnapshotsCreated", unit="Count", value=1)
    record_duration("SnapshotDuration", record.get("SnapshotCreateTime"))  # request to available
    logger.info("snapshot available", snapshot=event["SnapshotName"], bytes=total)
    events.snapshot_status(events.SNAPSHOT_CREATED, record, SnapshotStatus="available", CacheSize=str(total))
    return {
        "SnapshotName": event["SnapshotName"],
        "ReplicationGroupId": record["ReplicationGroupId"],
        "SnapshotStatus": "available",
        "CacheSize": total,
        "Warnings": event.get("Warnings", []),
    }


def mark_failed_step(event: dict[str, Any]) -> dict[str, Any]:
    """Fail the record this execution created (never someone else's), clean S3, unlock.

    Never raises for what is already gone (the record, the cache, the objects, the multipart
    uploads); any other cleanup error is reported in ``CleanupErrors`` once every other
    cleanup ran, so the original failure stays the execution's error.
    """
    state, execution, request, reason = caught_failure(event)
    name = str(request.get("SnapshotName", "")).lower()
    settings = Settings.from_env()
    catalog = Catalog(settings)
    errors: list[str] = []
    record = cleanup("read the snapshot record", lambda: catalog.find_snapshot(name), errors) if name else None
    ours = record is not None and record.get("ExecutionName") == execution and execution
    if ours:
        assert record is not None
        cleanup("stop the captures", lambda: capture_runner.cancel(name, f"snapshot {name} failed"), errors)
        s3 = client("s3")
        prefix = storage.snapshot_prefix(name)
        bucket = settings.bucket
        cleanup("abort the multipart uploads", lambda: storage.abort_incomplete_uploads(s3, bucket, prefix), errors)
        cleanup("delete the objects", lambda: storage.delete_prefix(s3, settings.bucket, prefix), errors)
        cleanup("delete the capture progress", lambda: catalog.delete_capture_progress(name), errors)
        cleanup("unlock the cache", lambda: catalog.unlock_cache(record["ReplicationGroupId"], owner=name), errors)
        # The status last: whoever sees "failed" finds the cleanup done and the cache unlocked.
        cleanup(
            "mark the snapshot failed",
            lambda: catalog.update_snapshot(name, SnapshotStatus="failed", FailureReason=reason, FailedAt=iso()),
            errors,
        )
        metrics.add_metric(name="SnapshotFailures", unit="Count", value=1)
        cleanup(
            "publish the failure event",
            lambda: events.snapshot_status(
                events.SNAPSHOT_CREATION_FAILED, record, SnapshotStatus="failed", FailureReason=reason
            ),
            errors,
        )
    logger.error("snapshot failed", snapshot=name, reason=reason, record_owned=bool(ours), cleanup_errors=errors)
    return {
        **state,
        "SnapshotStatus": "failed" if ours else None,
        "FailureReason": reason,
        **({"CleanupErrors": errors} if errors else {}),
    }
