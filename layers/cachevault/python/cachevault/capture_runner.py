"""Runs one shard's capture (replica -> S3 multipart) and reports it in the catalog.

StartCapture hands the work to a runner and returns; PollCapture reads the progress the
runner writes into the snapshot record (bytes, rate, heartbeat). Runners:

* ``thread`` (default, local): a worker thread beside the state machine, like a
  long-lived capture worker; no Lambda time limit applies.
* ``inline``: the capture runs inside the StartCapture invocation. On AWS Lambda this is
  bounded by the 15-minute limit (about 50 GB at the rates measured here, far less over a
  real network); larger shards need the thread runner on a long-lived worker (see README).

A runner never retries on its own; a failure is recorded and MarkFailed cleans up.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis

from cachevault import credentials as creds_mod
from cachevault import encryption, storage
from cachevault.aws import client
from cachevault.capture import CaptureProgress, capture_rdb
from cachevault.catalog import Catalog
from cachevault.credentials import Credentials
from cachevault.errors import CaptureFailed
from cachevault.handler import logger
from cachevault.settings import Settings
from cachevault.timeutil import iso

PROGRESS_INTERVAL_S = 1.0
_workers: dict[tuple[str, int], threading.Thread] = {}
_cancelled: set[str] = set()
_lock = threading.Lock()


class CaptureCancelled(CaptureFailed):
    pass


def start(snapshot: str, shard: dict[str, Any], settings: Settings) -> None:
    key = (snapshot, int(shard["ShardIndex"]))
    with _lock:
        existing = _workers.get(key)
        if existing is not None and existing.is_alive():
            return  # a retried StartCapture must not start a second stream
        for finished in [k for k, t in _workers.items() if not t.is_alive()]:
            del _workers[finished]
        _cancelled.discard(snapshot)
    # Clients are made now, inside the invocation: the worker outlives the handler's
    # environment (endpoint, credentials) in the local runtime.
    catalog, s3 = Catalog(settings), client("s3")
    # Resolved here by cache name (the payload never carries a secret), passed by reference.
    cache = shard.get("ReplicationGroupId") or catalog.get_snapshot(snapshot)["ReplicationGroupId"]
    credentials = creds_mod.for_cache_name(cache, catalog)
    # Read now as well: the encryption settings are function environment, gone once it returns.
    extra_args = encryption.s3_args()
    if _inline():
        run(
            snapshot, shard, catalog, s3, settings.bucket,
            raise_errors=True, credentials=credentials, extra_args=extra_args,
        )  # fmt: skip
        return
    worker = threading.Thread(
        target=run,
        args=(snapshot, shard, catalog, s3, settings.bucket),
        kwargs={"credentials": credentials, "extra_args": extra_args},
        name=f"capture-{snapshot}-{key[1]}",
        daemon=True,
    )
    with _lock:
        _workers[key] = worker
    worker.start()


def cancel(snapshot: str) -> None:
    """Ask running captures of a snapshot to stop (MarkFailed); they abort their uploads."""
    with _lock:
        _cancelled.add(snapshot)
        workers = [t for (name, _), t in _workers.items() if name == snapshot]
    for worker in workers:
        worker.join(timeout=30)
    if not any(worker.is_alive() for worker in workers):
        with _lock:
            _cancelled.discard(snapshot)


def _node_stats(host: str, port: int, credentials: Credentials = creds_mod.NONE) -> tuple[dict[str, int], int]:
    """Keys per database and the predicted RDB size: the dataset's memory (an RDB is rarely
    larger; the multipart plan tolerates a prediction 16x too low)."""
    conn = redis.Redis(
        host=host, port=port, socket_timeout=10, socket_connect_timeout=5, **credentials.redis_kwargs()
    )
    try:
        keyspace = conn.info("keyspace")
        memory = conn.info("memory")
    finally:
        conn.close()
    predicted = int(memory.get("used_memory_dataset") or memory.get("used_memory") or 0)
    return {db.removeprefix("db"): int(info["keys"]) for db, info in keyspace.items()}, predicted


def run(
    snapshot: str,
    shard: dict[str, Any],
    catalog: Catalog,
    s3: Any,
    bucket: str,
    raise_errors: bool = False,
    credentials: Credentials = creds_mod.NONE,
    extra_args: dict[str, str] | None = None,
) -> None:
    index = int(shard["ShardIndex"]) - 1
    group = shard["NodeGroupId"]
    key = storage.rdb_key(snapshot, index + 1)
    last_report = 0.0

    def report(progress: CaptureProgress) -> None:
        nonlocal last_report
        if snapshot in _cancelled:
            raise CaptureCancelled(f"snapshot {snapshot} was cancelled")
        now = time.monotonic()
        if now - last_report < PROGRESS_INTERVAL_S:
            return
        last_report = now
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
        keys, predicted_size = _node_stats(shard["Host"], int(shard["Port"]), credentials)
        catalog.set_capture_progress(
            snapshot,
            group,
            {
                "CaptureStatus": "running",
                "CaptureStartTime": iso(),
                "Heartbeat": time.time(),
                "KeysPerDb": keys,
                "KeyCount": sum(keys.values()),
            },
        )
        with storage.S3MultipartWriter(
            s3, bucket, key, extra_args=extra_args or encryption.s3_args(), expected_size=predicted_size
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


def _inline() -> bool:
    return os.environ.get("CAPTURE_RUNNER", "thread") == "inline"

