"""The control plane the CLI and the HTTP API share: start workflows, read the catalog.

Long operations are state machine executions; this module starts them with a unique
execution name, waits (bounded) until the catalog shows their record or the execution
fails, and turns an execution's failure back into the ElastiCache error it carried.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from cachevault.catalog import caches, storage
from cachevault.catalog.records import Catalog
from cachevault.catalog.snapshots import delete_snapshot
from cachevault.core import errors, names
from cachevault.core.aws import client
from cachevault.core.errors import CacheVaultError, InvalidParameterValue
from cachevault.core.settings import Settings
from cachevault.core.stack import StackInfo
from cachevault.nodes import credentials

CREATE_SNAPSHOT = "CreateSnapshotStateMachine"
RESTORE_SNAPSHOT = "RestoreSnapshotStateMachine"
DELETE_CACHE = "DeleteCacheStateMachine"
TERMINAL = ("SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED")

Progress = Callable[[dict[str, Any]], None]
# How long a call without --wait waits for the state machine to accept the request
# (its preflight passed): long enough for a normal preflight, not a promise.
ACCEPT_TIMEOUT_S = 60.0


class StillRunning(CacheVaultError):
    """A wait gave up; the execution itself goes on (nothing failed)."""

    code = "OperationStillRunning"

    def __init__(self, message: str, *, execution_arn: str, **details: Any) -> None:
        super().__init__(message, ExecutionArn=execution_arn, **details)
        self.execution_arn = execution_arn


def poll_pause(started: float, longest_s: float) -> float:
    """Seconds between two polls of a wait that began at ``started`` (monotonic).

    A twentieth of the time waited so far, from 0.2 s up to ``longest_s``: a short
    operation is seen done within ~5 % of its duration, a long one is polled no more
    often than before (DescribeExecution is throttled per account, and each poll also
    reads the catalog for the progress shown).
    """
    return min(longest_s, max(0.2, (time.monotonic() - started) / 20))


def execution_name(kind: str, subject: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in subject)[:56]
    return f"{kind}-{safe}-{uuid.uuid4().hex[:8]}"


def error_from_execution(description: dict[str, Any]) -> CacheVaultError:
    """The ElastiCache error a failed execution carried (Lambda error JSON in its cause)."""
    code = description.get("error") or "States.Failed"
    message = description.get("cause") or code
    try:
        parsed = json.loads(message)
        message = parsed.get("errorMessage", message)
        code = parsed.get("errorType", code)
    except (TypeError, ValueError, AttributeError):
        pass
    cls = getattr(errors, code, None)
    if isinstance(cls, type) and issubclass(cls, CacheVaultError):
        return cls(message)
    err = CacheVaultError(f"{code}: {message}")
    err.code = code
    return err




class ControlPlane:
    def __init__(self, stack: StackInfo, settings: Settings | None = None) -> None:
        self.stack = stack
        self.settings = settings or Settings.from_env()
        self.catalog = Catalog(self.settings)
        self.sfn = client("stepfunctions")

    # ---- executions ---------------------------------------------------------------------
    def start(self, machine: str, name: str, payload: dict[str, Any]) -> str:
        response = self.sfn.start_execution(
            stateMachineArn=self.stack.state_machine(machine), name=name, input=json.dumps(payload)
        )
        return response["executionArn"]

    def describe_execution(self, arn: str) -> dict[str, Any]:
        return self.sfn.describe_execution(executionArn=arn)

    def wait_execution(
        self,
        arn: str,
        *,
        timeout_s: float | None = None,
        on_tick: Callable[[], None] | None = None,
        interval_s: float = 0.5,
    ) -> dict[str, Any]:
        """Poll until the execution ends (``timeout_s`` None: however long it takes); raise its error if it failed.

        Giving up raises ``StillRunning``: the execution is not stopped.
        """
        started = time.monotonic()
        deadline = None if timeout_s is None else started + timeout_s
        while True:
            desc = self.describe_execution(arn)
            if desc["status"] in TERMINAL:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise StillRunning(
                    f"Execution {arn} is still {desc['status']} after {timeout_s:.0f} s; it goes on.",
                    execution_arn=arn,
                )
            if on_tick:
                on_tick()
            time.sleep(poll_pause(started, interval_s))
        if desc["status"] != "SUCCEEDED":
            raise error_from_execution(desc)
        return json.loads(desc.get("output") or "{}")

    def _wait_started(
        self,
        arn: str,
        ready: Callable[[], bool],
        timeout_s: float | None = ACCEPT_TIMEOUT_S,
        on_tick: Callable[[], None] | None = None,
    ) -> bool:
        """True once ``ready()`` (the record exists) or the execution ended well; raise its error if it failed.

        False when ``timeout_s`` passed first: the request is still queued or in its
        preflight, and its execution goes on (``None``: wait however long it takes).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while deadline is None or time.monotonic() < deadline:
            if ready():
                return True
            desc = self.describe_execution(arn)
            if desc["status"] in TERMINAL:
                if desc["status"] != "SUCCEEDED":
                    raise error_from_execution(desc)
                return True
            if on_tick:
                on_tick()
            time.sleep(0.2)
        return ready()

    # ---- snapshots ----------------------------------------------------------------------
    def create_snapshot(
        self,
        cache: str,
        snapshot: str,
        *,
        source_node: str | None = None,
        source: str = "manual",
        final: bool = False,
        poll_seconds: int | None = None,
        accept_timeout_s: float | None = ACCEPT_TIMEOUT_S,
        on_tick: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Start CreateSnapshot; returns the record once preflight passed (status creating).

        If the preflight has not run within ``accept_timeout_s`` (another operation holds
        the runtime), returns what was requested with ``"Accepted": False``: the execution
        goes on and may still refuse the request.
        """
        automatic = source == "automated"
        snapshot = names.snapshot_name(snapshot, automatic=automatic)
        cache = names.cache_name(cache)
        execution = execution_name("snapshot", snapshot)
        payload = {
            "SnapshotName": snapshot,
            "ReplicationGroupId": cache,
            "SnapshotSource": source,
            "SourceNode": source_node,
            "FinalSnapshot": final,
            "PollSeconds": poll_seconds or 1,
        }
        arn = self.start(CREATE_SNAPSHOT, execution, payload)

        def ours() -> bool:
            record = self.catalog.find_snapshot(snapshot)
            return record is not None and record.get("ExecutionName") == execution

        if not self._wait_started(arn, ours, accept_timeout_s, on_tick):
            return {
                "SnapshotName": snapshot,
                "ReplicationGroupId": cache,
                "SnapshotStatus": "creating",
                "SnapshotSource": source,
                "Accepted": False,
                "ExecutionArn": arn,
            }
        record = self.catalog.get_snapshot(snapshot)
        record["ExecutionArn"] = arn
        return record

    def wait_snapshot(
        self,
        snapshot: str,
        *,
        timeout_s: float | None = 3600,
        progress: Progress | None = None,
        execution_arn: str | None = None,
    ) -> dict[str, Any]:
        """Until the snapshot leaves ``creating``; a failed snapshot raises with its reason.

        With ``execution_arn`` it waits on the execution itself (its end, its error) and
        reports the record's progress meanwhile; ``timeout_s`` None waits however long.
        """
        if execution_arn:

            def tick() -> None:
                if progress:
                    record = self.catalog.find_snapshot(snapshot)
                    if record is not None:
                        progress(self.catalog.describe_snapshot(snapshot) if record["SnapshotStatus"] == "creating"
                                 else record)

            self.wait_execution(execution_arn, timeout_s=timeout_s, on_tick=tick)
            record = self.catalog.describe_snapshot(snapshot)
            if progress:
                progress(record)
            return record
        started = time.monotonic()
        deadline = started + (timeout_s or 3600)
        while True:
            record = self.catalog.describe_snapshot(snapshot)
            if progress:
                progress(record)
            if record["SnapshotStatus"] != "creating":
                break
            if time.monotonic() > deadline:
                raise CacheVaultError(f"Snapshot {snapshot!r} still creating after {timeout_s:.0f} s.")
            time.sleep(poll_pause(started, 0.5))
        if record["SnapshotStatus"] == "failed":
            raise errors.CaptureFailed(
                f"Snapshot {snapshot!r} failed: {record.get('FailureReason', 'unknown reason')}"
            )
        return record

    def describe_snapshot(self, snapshot: str) -> dict[str, Any]:
        return self.catalog.describe_snapshot(names.snapshot_name(snapshot, automatic=True))

    def list_snapshots(
        self,
        *,
        cache: str | None = None,
        source: str | None = None,
        max_records: int = 50,
        marker: str | None = None,
    ) -> dict[str, Any]:
        if source not in (None, "manual", "automated"):
            raise InvalidParameterValue(f"SnapshotSource must be manual or automated, not {source!r}.")
        items, next_marker = self.catalog.list_snapshots(
            cache=names.cache_name(cache) if cache else None,
            source=source,
            max_records=max_records,
            marker=marker,
        )
        page: dict[str, Any] = {"Snapshots": items}
        if next_marker:
            page["Marker"] = next_marker
        return page

    def delete_snapshot(self, snapshot: str) -> dict[str, Any]:
        """Remove the RDBs and manifest from S3, then the record (ElastiCache DeleteSnapshot)."""
        return delete_snapshot(self.catalog, names.snapshot_name(snapshot, automatic=True), self.settings)

    # ---- restore ------------------------------------------------------------------------
    def restore(
        self,
        target: str,
        *,
        snapshot: str | None = None,
        s3_sources: list[str] | None = None,
        num_shards: int | None = None,
        replicas: int | None = None,
        node_type: str | None = None,
        cluster_mode: str | None = None,
        allow_cluster_mode_disable: bool = False,
        security: dict[str, Any] | None = None,
        accept_timeout_s: float | None = ACCEPT_TIMEOUT_S,
        on_tick: Callable[[], None] | None = None,
    ) -> tuple[str, str]:
        """Start RestoreSnapshot; returns (execution ARN, target name) once preflight passed,
        or once ``accept_timeout_s`` passed with the execution still queued (it goes on).

        ``security`` holds the new cache's protection by reference only (AuthSecretArn,
        AuthParameterName, AuthUsername, TransitEncryptionEnabled, Tls*): never a secret.
        """
        target = names.cache_name(target)
        # Refused before anything starts (the state machine's preflight checks the same).
        caches.check_shape_values(num_shards=num_shards, replicas=replicas, node_type=node_type)
        payload: dict[str, Any] = {"ReplicationGroupId": target}
        if snapshot:
            payload["SnapshotName"] = names.snapshot_name(snapshot, automatic=True)
        if s3_sources:
            payload["SnapshotArns"] = list(s3_sources)
        for key, value in (
            ("NumNodeGroups", num_shards),
            ("ReplicasPerNodeGroup", replicas),
            ("CacheNodeType", node_type),
            ("ClusterMode", cluster_mode),
        ):
            if value is not None:
                payload[key] = value
        if allow_cluster_mode_disable:
            payload["AllowClusterModeDisable"] = True
        payload.update(credentials.security_fields(security or {}))
        execution = execution_name("restore", target)
        arn = self.start(RESTORE_SNAPSHOT, execution, payload)

        def ours() -> bool:
            cache = self.catalog.find_cache(target)
            return cache is not None and cache.get("RestoreExecution") == execution

        self._wait_started(arn, ours, accept_timeout_s, on_tick)
        return arn, target

    def wait_restore(
        self, arn: str, target: str, *, timeout_s: float | None = None, progress: Progress | None = None
    ) -> dict[str, Any]:
        def tick() -> None:
            if progress:
                cache = self.catalog.find_cache(target)
                if cache:
                    # Download and load progress the steps record (progress_report.PartProgress).
                    cache["RestoreProgress"] = self.catalog.operation_progress("restore", target)
                    progress(cache)

        result = self.wait_execution(arn, timeout_s=timeout_s, on_tick=tick)
        tick()  # the finished parts, also when the execution ended before the first tick
        return result

    # ---- copy / export (ElastiCache CopySnapshot) ----------------------------------------
    COPY_SNAPSHOT = "CopySnapshotStateMachine"

    def copy_snapshot(
        self,
        source: str,
        target: str,
        target_bucket: str | None = None,
        *,
        wait: bool = False,
        timeout_s: float | None = None,
        accept_timeout_s: float | None = ACCEPT_TIMEOUT_S,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Copy SOURCE to a new catalog snapshot TARGET, or export its RDBs to ``target_bucket``.

        Returns once the CopySnapshot execution accepted the request (refusals raise their
        ElastiCache error here; the source shows ``copying``), or with ``wait`` once it ended.
        """
        source = names.snapshot_name(source, automatic=True)
        target = names.snapshot_name(target)
        payload: dict[str, Any] = {"SourceSnapshotName": source, "TargetSnapshotName": target}
        if target_bucket:
            payload["TargetBucket"] = storage.check_bucket_name(target_bucket)
        execution = execution_name("copy", target)
        arn = self.start(self.COPY_SNAPSHOT, execution, payload)

        def accepted() -> bool:
            record = self.catalog.find_snapshot(source)
            return record is not None and record.get("CopyExecution") == execution

        accepted_now = self._wait_started(arn, accepted, None if wait else accept_timeout_s)
        result: dict[str, Any] = {
            "SourceSnapshotName": source,
            "TargetSnapshotName": target,
            "TargetBucket": target_bucket,
            "Mode": "export" if target_bucket else "copy",
            "SnapshotStatus": "copying",
        }
        if wait:

            def tick() -> None:
                if progress:
                    progress({**result, "CopyProgress": self.catalog.operation_progress("copy", target)})

            result.update(self.wait_execution(arn, timeout_s=timeout_s, on_tick=tick))
            tick()  # the finished parts, also when the execution ended before the first tick
        if not accepted_now:
            result["Accepted"] = False
        elif not target_bucket:
            result["Snapshot"] = self.catalog.get_snapshot(target)
        result["ExecutionArn"] = arn
        return result

    # ---- caches -------------------------------------------------------------------------
    def delete_cache(
        self,
        cache: str,
        *,
        final_snapshot: str | None = None,
        progress: Progress | None = None,
        timeout_s: float = 3 * 3600,
        poll_seconds: int = 1,
    ) -> dict[str, Any]:
        """DeleteReplicationGroup; with a final snapshot the cache goes only once it is available.

        Without a final snapshot the nodes stop here, synchronously. With one, the
        DeleteCache state machine runs (snapshot from the primaries, then delete) and this
        waits for it: a failed snapshot raises its reason and the cache stays.
        """
        name = names.cache_name(cache)
        record = self.catalog.get_cache(name)
        caches.check_not_restoring(record)  # refused before anything starts, final snapshot or not
        if record.get("LockedBy"):
            raise errors.InvalidReplicationGroupState(
                f"Replication group {name!r} is busy: {record.get('LockedFor')} {record['LockedBy']!r} is in "
                "progress; delete it when that has finished."
            )
        if not final_snapshot:
            caches.delete_local_cache(name, self.settings)
            return {"CacheName": name, "Status": "deleted"}
        snapshot = names.snapshot_name(final_snapshot)
        existing = self.catalog.find_snapshot(snapshot)
        if existing is not None and not (
            existing.get("SnapshotStatus") == "failed"
            and existing.get("FinalSnapshot")
            and existing.get("ReplicationGroupId") == name
        ):
            # Refused before anything starts; a failed final snapshot of this cache is replaced.
            raise errors.SnapshotAlreadyExistsFault(f"Snapshot {snapshot!r} already exists.")
        payload = {
            "ReplicationGroupId": name,
            "FinalSnapshotIdentifier": snapshot,
            "PollSeconds": poll_seconds,
            "MaxPolls": max(1, int(timeout_s / max(poll_seconds, 1))),
        }
        arn = self.start(DELETE_CACHE, execution_name("delete", name), payload)

        def tick() -> None:
            if progress:
                current = self.catalog.find_snapshot(snapshot)
                if current is not None:
                    creating = current["SnapshotStatus"] == "creating"
                    progress(self.catalog.describe_snapshot(snapshot) if creating else current)

        result = self.wait_execution(arn, timeout_s=timeout_s + 60, on_tick=tick)
        result["ExecutionArn"] = arn
        return result
