"""The DeleteCache state machine's steps: final snapshot first, then the cache.

``StartFinalSnapshot`` checks the request and starts a CreateSnapshot execution with
``FinalSnapshot=true`` (taken from each shard's PRIMARY, as ElastiCache does);
``WaitSnapshot``/``PollSnapshot`` loop (bounded by ``MaxPolls``) until the snapshot leaves
``creating``; only an ``available`` snapshot leads to ``DeleteCache``. A failed snapshot
fails the execution with its FailureReason and the cache is left untouched.

The start step does not wait for the snapshot's preflight: the local Lambda runtime
serializes functions whose environments differ, so a step that waited for another
function would wait for itself. Polling from the state machine also keeps every Lambda
short on AWS.

Retry after a failure is safe: a ``failed`` final snapshot of the same cache under the
same name is replaced (its record and any objects are removed through
``ControlPlane.delete_snapshot``) and a new one is taken. Any other existing snapshot of
that name is refused with SnapshotAlreadyExistsFault, as ElastiCache does.
"""

from __future__ import annotations

import time
from typing import Any

from cachevault.catalog import caches
from cachevault.core import names, polling
from cachevault.core.errors import (
    FinalSnapshotFailed,
    InvalidReplicationGroupState,
    SnapshotAlreadyExistsFault,
)
from cachevault.core.handler import logger, metrics
from cachevault.core.settings import Settings
from cachevault.ops.control_plane import CREATE_SNAPSHOT, error_from_execution, execution_name
from cachevault.ops.scheduler import lambda_control_plane

DEFAULT_POLL_SECONDS = 2
# Polls wait longer as the snapshot ages (polling.py): 2,000 polls cover weeks and stay
# within the 25,000 history events of one execution (~9 events per poll).
DEFAULT_MAX_POLLS = 2000


def check_request(control: Any, cache: str, snapshot: str) -> tuple[str, str, dict[str, Any] | None]:
    """(cache, snapshot, failed record to replace or None); raises what ElastiCache would."""
    cache = names.cache_name(cache)
    snapshot = names.snapshot_name(snapshot)
    record = control.catalog.get_cache(cache)
    caches.check_not_restoring(record)  # a restore still creating it owns it until it ends
    if record.get("LockedBy"):
        raise InvalidReplicationGroupState(
            f"Replication group {cache!r} is busy: {record.get('LockedFor')} {record['LockedBy']!r} is in "
            "progress; delete it when that has finished."
        )
    existing = control.catalog.find_snapshot(snapshot)
    replace = None
    if existing is not None:
        retry = (
            existing.get("SnapshotStatus") == "failed"
            and existing.get("FinalSnapshot")
            and existing.get("ReplicationGroupId") == cache
        )
        if not retry:
            raise SnapshotAlreadyExistsFault(f"Snapshot {snapshot!r} already exists.")
        replace = existing
    return cache, snapshot, replace


def start_final_snapshot_step(event: dict[str, Any]) -> dict[str, Any]:
    control = lambda_control_plane(Settings.from_env())
    cache, snapshot, replace = check_request(control, event["ReplicationGroupId"], event["FinalSnapshotIdentifier"])
    if replace is not None:
        control.delete_snapshot(snapshot)
        logger.info("replaced failed final snapshot", snapshot=snapshot, reason=replace.get("FailureReason"))
    poll_seconds = int(event.get("PollSeconds") or DEFAULT_POLL_SECONDS)
    execution = execution_name("final", snapshot)
    arn = control.start(
        CREATE_SNAPSHOT,
        execution,
        {
            "SnapshotName": snapshot,
            "ReplicationGroupId": cache,
            "SnapshotSource": "manual",
            "SourceNode": None,
            "FinalSnapshot": True,
            "PollSeconds": poll_seconds,
        },
    )
    logger.info("final snapshot started", cache=cache, snapshot=snapshot, execution=arn)
    return {
        "ReplicationGroupId": cache,
        "FinalSnapshotIdentifier": snapshot,
        "SnapshotExecutionArn": arn,
        "SnapshotExecutionName": execution,
        "PollSeconds": poll_seconds,
        "MaxPolls": int(event.get("MaxPolls") or DEFAULT_MAX_POLLS),
        "Polls": 0,
        "Done": False,
        "StartedAtEpoch": time.time(),
        "NextPollSeconds": poll_seconds,
        "ExecutionName": event.get("ExecutionName"),
    }


def poll_final_snapshot_step(event: dict[str, Any]) -> dict[str, Any]:
    """Done once the snapshot is available; raise the snapshot's failure, or on timeout."""
    control = lambda_control_plane(Settings.from_env())
    snapshot = event["FinalSnapshotIdentifier"]
    polls = int(event.get("Polls", 0)) + 1
    record = control.catalog.find_snapshot(snapshot)
    wanted = event.get("SnapshotExecutionName")
    # Without an execution (a direct invocation) the cache's own snapshot of that name counts.
    ours = record is not None and (
        record.get("ExecutionName") == wanted
        if wanted
        else record.get("ReplicationGroupId") == event["ReplicationGroupId"]
    )
    if ours and record["SnapshotStatus"] == "available":
        return {**event, "Polls": polls, "Done": True}
    wait = polling.next_poll_seconds(event.get("StartedAtEpoch"), int(event.get("PollSeconds") or DEFAULT_POLL_SECONDS))
    if ours and record["SnapshotStatus"] == "failed":
        raise FinalSnapshotFailed(
            f"Final snapshot {snapshot!r} failed, so replication group {event['ReplicationGroupId']!r} was not "
            f"deleted: {record.get('FailureReason', 'unknown reason')}"
        )
    if event.get("SnapshotExecutionArn"):
        execution = control.describe_execution(event["SnapshotExecutionArn"])
        if execution["status"] in ("FAILED", "TIMED_OUT", "ABORTED"):
            # Refused before it made a record (preflight): that error, verbatim.
            raise error_from_execution(execution)
    if polls >= int(event["MaxPolls"]):
        raise FinalSnapshotFailed(
            f"Final snapshot {snapshot!r} still {record['SnapshotStatus'] if ours else 'starting'} after "
            f"{polls} polls; replication group {event['ReplicationGroupId']!r} was not deleted."
        )
    return {**event, "Polls": polls, "Done": False, "NextPollSeconds": wait}


def delete_cache_step(event: dict[str, Any]) -> dict[str, Any]:
    """The final snapshot is available: stop the nodes and remove the cache's record.

    A retried task whose first attempt already removed the cache succeeds (nothing left to do).
    """
    settings = Settings.from_env()
    control = lambda_control_plane(settings)
    snapshot = control.catalog.get_snapshot(event["FinalSnapshotIdentifier"])
    if snapshot["SnapshotStatus"] != "available":  # never delete without the snapshot
        raise FinalSnapshotFailed(f"Final snapshot {snapshot['SnapshotName']!r} is {snapshot['SnapshotStatus']!r}.")
    if control.catalog.find_cache(event["ReplicationGroupId"]) is not None:
        caches.delete_local_cache(event["ReplicationGroupId"], settings)
    metrics.add_metric(name="CachesDeleted", unit="Count", value=1)
    logger.info("cache deleted after final snapshot", cache=event["ReplicationGroupId"], snapshot=snapshot)
    return {"CacheName": event["ReplicationGroupId"], "Status": "deleted", "FinalSnapshot": snapshot}
