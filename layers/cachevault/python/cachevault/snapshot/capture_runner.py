"""Runs one shard's capture (replica -> S3 multipart) and reports it in the progress table.

Where it runs is decided per shard by :func:`plan` from the predicted RDB size (INFO
``used_memory_dataset``) and the configured rate (``CAPTURE_RATE_BYTES_PER_SECOND``):

* ``inline``: inside the StartCapture Lambda, when the predicted time is at most
  ``INLINE_CAPTURE_MAX_SECONDS`` (well inside the 15-minute limit);
* ``ecs``: an ECS Fargate task (``python -m cachevault.worker capture``, the capture
  worker task definition) that the state machine starts with ``ecs:runTask``.

Both call :func:`run`, which writes the same progress (bytes, rate, heartbeat) that
PollCapture reads; a worker whose heartbeat stalls is failed and stopped there, and
MarkFailed stops every task of the snapshot (:func:`cancel`) and aborts the uploads.
A runner never retries on its own; a failure is recorded and MarkFailed cleans up.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from cachevault.catalog import storage
from cachevault.catalog.records import Catalog
from cachevault.core import encryption
from cachevault.core.aws import client
from cachevault.core.errors import CaptureFailed
from cachevault.core.handler import logger
from cachevault.core.settings import Settings
from cachevault.core.timeutil import iso
from cachevault.nodes import credentials as creds_mod
from cachevault.nodes import restore_targets, topology
from cachevault.nodes.credentials import Credentials
from cachevault.snapshot.capture import CaptureProgress, capture_rdb

PROGRESS_INTERVAL_S = 1.0
DEFAULT_RATE_BYTES_PER_SECOND = 50_000_000
DEFAULT_INLINE_MAX_SECONDS = 540.0
INLINE = "inline"
ECS = "ecs"


class CaptureCancelled(CaptureFailed):
    pass


def task_group(snapshot: str) -> str:
    """The RunTask group of a snapshot's capture tasks (how MarkFailed finds them)."""
    return f"capture:{snapshot}"


def plan(shard: dict[str, Any], credentials: Credentials = creds_mod.NONE) -> dict[str, Any]:
    """Inline or ECS for one shard, with the prediction it rests on."""
    memory = topology.node_memory(shard["Host"], int(shard["Port"]), credentials=credentials)
    predicted = memory["used_memory_dataset"] or memory["used_memory"]
    rate = float(os.environ.get("CAPTURE_RATE_BYTES_PER_SECOND") or DEFAULT_RATE_BYTES_PER_SECOND)
    limit = float(os.environ.get("INLINE_CAPTURE_MAX_SECONDS") or DEFAULT_INLINE_MAX_SECONDS)
    seconds = predicted / rate
    return {"Runner": INLINE if seconds <= limit else ECS, "PredictedBytes": predicted,
            "PredictedSeconds": round(seconds, 3)}  # fmt: skip


def run_inline(snapshot: str, shard: dict[str, Any], settings: Settings) -> None:
    """The capture inside this invocation (StartCapture); errors are recorded, then raised."""
    catalog = Catalog(settings)
    cache = shard.get("ReplicationGroupId") or catalog.get_snapshot(snapshot)["ReplicationGroupId"]
    try:
        run(snapshot, shard, catalog, client("s3"), settings.bucket, raise_errors=True,
            credentials=creds_mod.for_cache_name(cache, catalog))  # fmt: skip
    except Exception as exc:  # what PollCapture says of a failed ECS capture, naming the node
        node = shard.get("CacheNodeId") or f"{shard['Host']}:{shard['Port']}"
        raise CaptureFailed(f"Capture of shard {shard['NodeGroupId']} from {node} failed: {exc}") from exc


def snapshot_failed(catalog: Catalog, snapshot: str) -> Callable[[], bool]:
    """For a worker: has MarkFailed (or a delete) ended the snapshot it captures for?"""

    def check() -> bool:
        record = catalog.find_snapshot(snapshot)
        return record is None or record.get("SnapshotStatus") != "creating"

    return check


def cancel(snapshot: str, reason: str = "snapshot failed") -> list[str]:
    """Stop every capture task of a snapshot still running (MarkFailed); their ARNs."""
    settings = restore_targets.TaskSettings.from_env()
    stopped = restore_targets.running_tasks_by_group(settings).get(task_group(snapshot), [])
    restore_targets.stop_tasks(stopped, reason, settings)
    return stopped


def task_state(task_arn: str) -> dict[str, Any]:
    """lastStatus, stoppedReason and exit codes of a capture task."""
    settings = restore_targets.TaskSettings.from_env()
    tasks = client("ecs").describe_tasks(cluster=settings.cluster, tasks=[task_arn])["tasks"]
    if not tasks:
        return {"lastStatus": "STOPPED", "stoppedReason": "task not found", "exitCodes": []}
    task = tasks[0]
    return {
        "lastStatus": task["lastStatus"],
        "stoppedReason": task.get("stoppedReason", ""),
        "exitCodes": [c.get("exitCode") for c in task.get("containers", [])],
    }


@dataclass(frozen=True)
class NodeStats:
    keys_per_db: dict[str, int]
    expires_per_db: dict[str, int]
    modules: list[str]  # modules the node has loaded: only they can put module values in its RDB
    predicted_size: int  # the dataset's memory (an RDB is rarely larger; the multipart plan tolerates 16x too low)


def module_names(info: dict[str, Any]) -> list[str]:
    """The modules INFO modules lists, as redis-py parses it: ``{"modules": [{"name": ...}, ...]}``."""
    return [str(m.get("name")) for m in info.get("modules") or [] if isinstance(m, dict)]


def _node_stats(host: str, port: int, credentials: Credentials = creds_mod.NONE) -> NodeStats:
    """What the source node says of its data before the capture (INFO: counts at that moment)."""
    conn = redis.Redis(
        host=host, port=port, socket_timeout=10, socket_connect_timeout=5, **credentials.redis_kwargs()
    )
    try:
        keyspace = conn.info("keyspace")
        memory = conn.info("memory")
        modules = module_names(conn.info("modules"))
    finally:
        conn.close()
    return NodeStats(
        keys_per_db={db.removeprefix("db"): int(info["keys"]) for db, info in keyspace.items()},
        expires_per_db={db.removeprefix("db"): int(info.get("expires", 0)) for db, info in keyspace.items()},
        modules=modules,
        predicted_size=int(memory.get("used_memory_dataset") or memory.get("used_memory") or 0),
    )


def run(
    snapshot: str,
    shard: dict[str, Any],
    catalog: Catalog,
    s3: Any,
    bucket: str,
    raise_errors: bool = False,
    credentials: Credentials = creds_mod.NONE,
    extra_args: dict[str, str] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> None:
    index = int(shard["ShardIndex"]) - 1
    group = shard["NodeGroupId"]
    key = storage.rdb_key(snapshot, index + 1)
    last_report = 0.0

    def report(progress: CaptureProgress) -> None:
        nonlocal last_report
        now = time.monotonic()
        if now - last_report < PROGRESS_INTERVAL_S:
            return
        last_report = now
        if cancelled is not None and cancelled():
            raise CaptureCancelled(f"snapshot {snapshot} is no longer being created")
        catalog.set_capture_progress(
            snapshot,
            group,
            {
                "BytesCaptured": progress.bytes,
                "RateBytesPerSecond": int(progress.rate_bps),
                "Heartbeat": time.time(),
            },
        )

    try:
        stats = _node_stats(shard["Host"], int(shard["Port"]), credentials)
        catalog.set_capture_progress(
            snapshot,
            group,
            {
                "CaptureStatus": "running",
                "CaptureStartTime": iso(),
                "Heartbeat": time.time(),
                "KeysPerDb": stats.keys_per_db,
                "ExpiresPerDb": stats.expires_per_db,
                "KeyCount": sum(stats.keys_per_db.values()),
                "Modules": stats.modules,
            },
        )
        with storage.S3MultipartWriter(
            s3, bucket, key, extra_args=extra_args or encryption.s3_args(), expected_size=stats.predicted_size
        ) as writer:
            result = capture_rdb(
                shard["Host"], int(shard["Port"]), writer.write, progress=report, credentials=credentials
            )
        catalog.set_capture_progress(
            snapshot,
            group,
            {
                "CaptureStatus": "done",
                "CaptureEndTime": iso(),
                "Heartbeat": time.time(),
                "BytesCaptured": result.size,
                "Size": result.size,
                "Sha256": result.sha256,
                "RdbVersion": result.rdb_version,
                "ReplicationId": result.replid,
                "ReplicationOffset": result.repl_offset,
                "CaptureMode": result.mode,
                "CaptureSeconds": round(result.duration_s, 3),
            },
        )
        logger.info("capture done", snapshot=snapshot, shard=index + 1, bytes=result.size)
    except Exception as exc:  # recorded for PollCapture; the state machine decides what follows
        logger.exception("capture failed", snapshot=snapshot, shard=index + 1)
        try:
            catalog.set_capture_progress(
                snapshot, group, {"CaptureStatus": "failed", "CaptureError": str(exc), "Heartbeat": time.time()}
            )
        except Exception:  # the record itself may be gone (snapshot deleted)
            logger.exception("could not record the capture failure", snapshot=snapshot)
        if raise_errors:
            raise

