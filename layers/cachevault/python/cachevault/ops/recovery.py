"""Recovery of operations whose execution ended without its Catch (issue 12).

A state machine execution can end without running its failure step: StopExecution, an
execution timeout, an abort; locally also the embedded AWS killed (its executions are then
gone). Its records stay in a transient state: a snapshot ``creating`` (its cache locked), a
source snapshot ``restoring``/``copying``, a restore target ``creating`` with node tasks
running, work objects, multipart uploads and progress rows.

``recover_interrupted`` finds every such record, asks Step Functions about the execution
named on it, and when that execution is no longer RUNNING ends the operation the way its
Catch would have, by calling that failure step itself (snapshot/steps.py MarkFailed,
restore/steps.py fail_step, ops/copy_steps.py MarkFailed) with an ``Interrupted`` error.
Operations whose execution runs are left alone. Then it removes what ended operations left
behind (a step still in flight when its execution was stopped may write after the recovery:
running it again removes that too). Every cleanup failure is reported, none stops the rest.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from botocore.exceptions import ClientError

from cachevault.catalog import storage
from cachevault.catalog.progress_report import COPY, RESTORE
from cachevault.catalog.snapshots import finish_deleting
from cachevault.core.aws import client
from cachevault.core.errors import InvalidSnapshotState
from cachevault.core.failures import cleanup
from cachevault.core.stack import StackInfo
from cachevault.nodes import restore_targets
from cachevault.ops import copy_steps, imports
from cachevault.ops.control_plane import CREATE_SNAPSHOT, RESTORE_SNAPSHOT, ControlPlane
from cachevault.restore import steps as restore_steps
from cachevault.snapshot import capture_runner
from cachevault.snapshot import steps as snapshot_steps

COPY_SNAPSHOT = ControlPlane.COPY_SNAPSHOT
GONE = "GONE"  # DescribeExecution answered one of GONE_CODES
GONE_CODES = ("ExecutionDoesNotExist", "StateMachineDoesNotExist")
RESTORING_CACHE = ("creating", "restoring")  # a restore's target while its execution runs
ERROR = "Interrupted"
# Plain logging: the CLI imports this module (the failure steps log through Powertools).
log = logging.getLogger(__name__)


def execution_arn(state_machine_arn: str, name: str) -> str:
    """``arn:aws:states:R:A:stateMachine:M`` + name -> ``arn:aws:states:R:A:execution:M:name``."""
    return f"{state_machine_arn.replace(':stateMachine:', ':execution:', 1)}:{name}"


def load_task_group(execution: str) -> str:
    """The RunTask group of a restore's load workers (statemachines/restore_snapshot.asl.json)."""
    return f"load:{execution}"


def interrupted_reason(execution: str, status: str) -> str:
    """What a person reads as the failure's cause (the step makes it ``Interrupted: <this>``)."""
    if status == GONE:
        return f"execution {execution} no longer exists (the embedded AWS was restarted, or its history expired)"
    if status in ("ABORTED", "TIMED_OUT"):
        return f"execution {execution} {status} before it finished"
    return f"execution {execution} {status} without finishing the operation"


class Recovery:
    """One pass over the catalog; ``run`` returns the report."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.catalog = control.catalog
        self.settings = control.settings
        self.ended: list[dict[str, Any]] = []
        self.running: list[dict[str, Any]] = []
        self.leftovers: list[str] = []
        self.errors: list[str] = []
        self._statuses: dict[tuple[str, str], str] = {}

    # ---- executions ---------------------------------------------------------------------
    def status(self, machine: str, execution: str) -> str:
        """RUNNING, SUCCEEDED, FAILED, TIMED_OUT, ABORTED, or GONE."""
        key = (machine, execution)
        if key not in self._statuses:
            arn = execution_arn(self.control.stack.state_machine(machine), execution)
            try:
                self._statuses[key] = str(self.control.describe_execution(arn)["status"])
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") not in GONE_CODES:
                    raise
                self._statuses[key] = GONE
        return self._statuses[key]

    def _ended(self, machine: str, execution: str, entry: dict[str, Any]) -> str | None:
        """The reason to end the operation, or None when its execution runs (or cannot be asked)."""
        if not execution:
            return None
        try:
            status = self.status(machine, execution)
        except Exception as exc:  # reported, the other operations go on
            self.errors.append(f"describe execution {execution}: {type(exc).__name__}: {exc}")
            return None
        if status == "RUNNING":
            self.running.append({**entry, "ExecutionName": execution, "ExecutionStatus": status})
            return None
        entry.update(ExecutionName=execution, ExecutionStatus=status)
        return interrupted_reason(execution, status)

    def _record(self, entry: dict[str, Any], result: dict[str, Any], status: str, reason: str) -> None:
        errors = list(result.get("CleanupErrors") or [])
        self.ended.append({**entry, "Status": status, "FailureReason": f"{ERROR}: {reason}",
                           **({"CleanupErrors": errors} if errors else {})})  # fmt: skip
        log.info("ended %s %s: %s", entry["Operation"], entry.get("SnapshotName") or entry.get("ReplicationGroupId"),
                    reason)  # fmt: skip

    @staticmethod
    def _catch(request: dict[str, Any], execution: str, reason: str) -> dict[str, Any]:
        """The input a failure step gets from its state machine's Catch."""
        return {"State": {"Request": request, "Error": {"Error": ERROR, "Cause": reason}}, "ExecutionName": execution}

    # ---- the pass -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        snapshots = self._read("read the snapshot records", self.catalog.all_snapshots) or []
        caches = self._read("read the cache registry", self.catalog.list_caches) or []
        for cache in caches:
            if cache.get("Status") in RESTORING_CACHE and cache.get("RestoreExecution"):
                self._guarded(f"restore into {cache['CacheName']}", lambda c=cache: self.restore(c))
        for snap in snapshots:
            status = snap.get("SnapshotStatus")
            name = snap["SnapshotName"]
            if status == "copying" and snap.get("CopyExecution"):
                self._guarded(f"copy of {name}", lambda s=snap: self.copy(s))
            elif status == "creating":
                self._guarded(f"creation of {name}", lambda s=snap: self.creation(s))
            elif status == "deleting":
                self._guarded(f"deletion of {name}", lambda s=snap: self.deletion(s))
        # What the passes above changed decides what is orphaned now.
        snapshots = self._read("read the snapshot records", self.catalog.all_snapshots) or []
        caches = self._read("read the cache registry", self.catalog.list_caches) or []
        for snap in snapshots:
            if snap.get("SnapshotStatus") == "restoring":
                self._guarded(f"hand back {snap['SnapshotName']}", lambda s=snap: self.restoring(s, caches))
        for cache in caches:
            if cache.get("LockedBy"):
                self._guarded(f"lock of {cache['CacheName']}", lambda c=cache: self.lock(c, snapshots))
        self._guarded("remove leftovers", lambda: self.sweep(snapshots, caches))
        self._guarded("settle imports", lambda: imports.list_imports(self.settings, sfn=self.control.sfn))
        report: dict[str, Any] = {"RecoveredOperations": self.ended, "RunningOperations": self.running,
                                  "LeftoversRemoved": self.leftovers}  # fmt: skip
        if self.errors:
            report["Errors"] = self.errors
        return report

    def _read(self, what: str, action: Callable[[], Any]) -> Any:
        return cleanup(what, action, self.errors)

    def _guarded(self, what: str, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as exc:  # one operation's trouble never stops the others
            log.exception("recovery of %s failed", what)
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")

    # ---- one operation each -------------------------------------------------------------------
    def creation(self, snap: dict[str, Any]) -> None:
        """A snapshot ``creating``: by CreateSnapshot, or a copy's target (its source may be gone)."""
        name, execution = snap["SnapshotName"], str(snap.get("ExecutionName") or "")
        copied_from = snap.get("CopiedFrom")
        if copied_from:
            source = self.catalog.find_snapshot(copied_from)
            if source is not None and source.get("CopyExecution") == execution:
                return  # its copy (the source's ``copying``) ends it
        machine = COPY_SNAPSHOT if copied_from else CREATE_SNAPSHOT
        entry = {"Operation": "CopySnapshot" if copied_from else "CreateSnapshot", "SnapshotName": name,
                 "ReplicationGroupId": snap.get("ReplicationGroupId")}  # fmt: skip
        reason = self._ended(machine, execution, entry)
        if reason is None or not self._still(name, "creating"):
            return
        # MarkFailed of CreateSnapshot: stops the capture tasks, aborts the uploads, deletes
        # the objects and progress, unlocks the cache (a copy's target holds no lock or task;
        # its copy progress goes in the sweep).
        result = snapshot_steps.mark_failed_step(self._catch({"SnapshotName": name}, execution, reason))
        self._record(entry, result, "failed", reason)

    def copy(self, source: dict[str, Any]) -> None:
        name, execution = source["SnapshotName"], str(source["CopyExecution"])
        target, bucket = source.get("CopyTarget"), source.get("CopyTargetBucket")
        entry = {"Operation": "CopySnapshot", "SourceSnapshotName": name, "TargetSnapshotName": target,
                 "TargetBucket": bucket}  # fmt: skip
        reason = self._ended(COPY_SNAPSHOT, execution, entry)
        if reason is None or not self._still(name, "copying"):
            return
        if not target:  # a copy started before sources named their target: from the execution, when kept
            target, bucket = self._copy_target_from_execution(execution, name)
            entry.update(TargetSnapshotName=target, TargetBucket=bucket)
        request = {"SourceSnapshotName": name, "TargetSnapshotName": target or "", "TargetBucket": bucket}
        result = copy_steps.mark_failed_step(self._catch(request, execution, reason))
        self._record(entry, result, "failed", reason)

    def _copy_target_from_execution(self, execution: str, source: str) -> tuple[str | None, str | None]:
        with contextlib.suppress(ClientError, KeyError, ValueError):
            arn = execution_arn(self.control.stack.state_machine(COPY_SNAPSHOT), execution)
            request = json.loads(self.control.describe_execution(arn).get("input") or "{}")
            return request.get("TargetSnapshotName"), request.get("TargetBucket")
        for snap in self.catalog.all_snapshots():
            if snap.get("CopiedFrom") == source and snap.get("ExecutionName") == execution:
                return snap["SnapshotName"], None
        return None, None

    def restore(self, cache: dict[str, Any]) -> None:
        target, execution = cache["CacheName"], str(cache["RestoreExecution"])
        entry = {"Operation": "RestoreSnapshot", "ReplicationGroupId": target,
                 "SnapshotName": cache.get("SnapshotRestoring") or cache.get("RestoreSource")}  # fmt: skip
        reason = self._ended(RESTORE_SNAPSHOT, execution, entry)
        if reason is None:
            return
        current = self.catalog.find_cache(target)
        if not current or current.get("Status") not in RESTORING_CACHE or current.get("RestoreExecution") != execution:
            return  # ended meanwhile
        # First what still writes: load workers, and node tasks started but not yet recorded.
        groups = restore_targets.running_tasks_by_group()
        orphans = groups.get(load_task_group(execution), [])
        if current.get("Managed") == "ecs":
            orphans += groups.get(restore_targets.node_task_group(target), [])
        restore_targets.stop_tasks(orphans, f"restore into {target} interrupted")
        # fail_step: stops the recorded nodes, marks the cache failed, hands the snapshot back,
        # deletes the work objects; an external cache goes back to available. Its progress rows
        # (which fail_step's role may not delete) go in the sweep below.
        result = restore_steps.fail_step(self._catch({"ReplicationGroupId": target}, execution, reason))
        self._record(entry, result, str(result.get("Status") or "failed"), reason)

    def deletion(self, snap: dict[str, Any]) -> None:
        """DeleteSnapshot runs in its caller (no execution): one that died half way is finished."""
        finish_deleting(self.catalog, snap, self.settings)
        self.ended.append({"Operation": "DeleteSnapshot", "SnapshotName": snap["SnapshotName"], "Status": "deleted"})

    def restoring(self, snap: dict[str, Any], caches: list[dict[str, Any]]) -> None:
        """A snapshot ``restoring`` that no restore of a live target holds: available again."""
        name = snap["SnapshotName"]
        for cache in caches:
            holds = name in (cache.get("SnapshotRestoring"), cache.get("RestoreSource"))
            if holds and cache.get("Status") in RESTORING_CACHE and cache.get("RestoreExecution"):
                return  # its restore decides (running, or ended above)
        with contextlib.suppress(InvalidSnapshotState):  # changed meanwhile: not ours to touch
            self.catalog.update_snapshot(name, expect_status="restoring", SnapshotStatus="available")
            self.ended.append({"Operation": "RestoreSnapshot", "SnapshotName": name, "Status": "available",
                               "FailureReason": f"{ERROR}: no restore holds the snapshot any more"})  # fmt: skip

    def lock(self, cache: dict[str, Any], snapshots: list[dict[str, Any]]) -> None:
        """A cache lock whose snapshot is no longer being created, and no running execution will."""
        owner, name = str(cache["LockedBy"]), cache["CacheName"]
        record = next((s for s in snapshots if s["SnapshotName"] == owner), None)
        if record is not None and record.get("SnapshotStatus") == "creating":
            return  # its snapshot's execution runs (or its end was reported above)
        if record is None and owner in self._starting_snapshots():
            return  # preflight between taking the lock and writing the record
        self.catalog.unlock_cache(name, owner=owner)
        self.ended.append({"Operation": "CreateSnapshot", "ReplicationGroupId": name, "SnapshotName": owner,
                           "Status": "unlocked",
                           "FailureReason": f"{ERROR}: lock held for snapshot {owner}, which is not being created"})

    def _starting_snapshots(self) -> set[str]:
        """Snapshot names of the running CreateSnapshot executions (their input)."""
        names: set[str] = set()
        machine = self.control.stack.state_machine(CREATE_SNAPSHOT)
        pages = self.control.sfn.get_paginator("list_executions").paginate(
            stateMachineArn=machine, statusFilter="RUNNING"
        )
        for execution in (e for page in pages for e in page.get("executions", [])):
            desc = self.control.describe_execution(execution["executionArn"])
            with contextlib.suppress(ValueError, AttributeError):
                names.add(str(json.loads(desc.get("input") or "{}").get("SnapshotName", "")).lower())
        return names

    def _still(self, name: str, status: str) -> bool:
        record = self.catalog.find_snapshot(name)
        return record is not None and record.get("SnapshotStatus") == status

    # ---- leftovers of ended operations (also what late steps wrote) -------------------------
    def sweep(self, snapshots: list[dict[str, Any]], caches: list[dict[str, Any]]) -> None:
        status = {s["SnapshotName"]: s.get("SnapshotStatus") for s in snapshots}
        live_restores = {(c["CacheName"], str(c["RestoreExecution"])) for c in caches
                         if c.get("Status") in RESTORING_CACHE and c.get("RestoreExecution")}  # fmt: skip
        restoring_targets = {target for target, _ in live_restores}
        copying = any(s == "copying" for s in status.values())
        for subject in self._progress_subjects():
            operation, _, name = subject.rpartition("#")
            live = {
                RESTORE: name in restoring_targets,
                COPY: status.get(name) == "creating" or copying,  # an export's subject has no record
                "": status.get(name) == "creating",
            }.get(operation, True)
            if not live:
                cleanup(f"delete progress {subject}", lambda s=subject: self.catalog.delete_capture_progress(s),
                        self.errors)  # fmt: skip
                self.leftovers.append(f"progress {subject}")
        s3, bucket = client("s3"), self.settings.bucket
        for key in self._uploads(s3, bucket, storage.SNAPSHOTS_PREFIX):
            name = key[len(storage.SNAPSHOTS_PREFIX) :].partition("/")[0]
            if status.get(name) != "creating":
                prefix = storage.snapshot_prefix(name)
                abort = lambda p=prefix: storage.abort_incomplete_uploads(s3, bucket, p)  # noqa: E731
                cleanup(f"abort uploads under {prefix}", abort, self.errors)
                self.leftovers.append(f"s3://{bucket}/{key} (multipart upload)")
        for name in (n for n, st in status.items() if st == "failed"):
            prefix = storage.snapshot_prefix(name)
            removed = self._delete_prefix(s3, bucket, prefix)
            if removed:
                self.leftovers.append(f"s3://{bucket}/{prefix} ({removed} objects)")
        for target, execution in self._restore_work(s3, bucket):
            if (target, execution) not in live_restores:
                prefix = storage.restore_prefix(target, execution)
                removed = self._delete_prefix(s3, bucket, prefix)
                if removed:
                    self.leftovers.append(f"s3://{bucket}/{prefix} ({removed} objects)")
        self._stop_orphan_tasks(status, caches, {execution for _, execution in live_restores})

    def _stop_orphan_tasks(self, status: dict[str, Any], caches: list[dict[str, Any]], live: set[str]) -> None:
        failed = {c["CacheName"] for c in caches if c.get("Status") == "failed" and c.get("Managed") == "ecs"}
        for group, arns in restore_targets.running_tasks_by_group().items():
            subject = group.partition(":")[2]
            orphan = (
                (group == capture_runner.task_group(subject) and status.get(subject) != "creating")
                or (group == load_task_group(subject) and subject not in live)
                or (group == restore_targets.node_task_group(subject) and subject in failed)
            )
            if orphan:
                cleanup(f"stop the tasks of {group}", lambda a=arns, g=group: restore_targets.stop_tasks(
                    a, f"{g}: its operation ended"), self.errors)  # fmt: skip
                self.leftovers.extend(f"task {arn} ({group})" for arn in arns)

    def _delete_prefix(self, s3: Any, bucket: str, prefix: str) -> int:
        return int(cleanup(f"delete {prefix}", lambda: storage.delete_prefix(s3, bucket, prefix), self.errors) or 0)

    def _progress_subjects(self) -> set[str]:
        table = self.catalog.progress
        subjects: set[str] = set()
        page = table.scan(ProjectionExpression="SnapshotName")
        subjects.update(str(i["SnapshotName"]) for i in page.get("Items", []))
        while page.get("LastEvaluatedKey"):
            page = table.scan(ProjectionExpression="SnapshotName", ExclusiveStartKey=page["LastEvaluatedKey"])
            subjects.update(str(i["SnapshotName"]) for i in page.get("Items", []))
        return subjects

    @staticmethod
    def _uploads(s3: Any, bucket: str, prefix: str) -> Iterator[str]:
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
            yield from (u["Key"] for u in page.get("Uploads", []))

    @staticmethod
    def _restore_work(s3: Any, bucket: str) -> Iterator[tuple[str, str]]:
        """(target, execution) of every restore work prefix ``restores/<target>/<execution>/``."""
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=storage.RESTORES_PREFIX)
        seen: set[tuple[str, str]] = set()
        for obj in (o for page in pages for o in page.get("Contents", [])):
            parts = obj["Key"][len(storage.RESTORES_PREFIX) :].split("/")
            if len(parts) >= 3 and (parts[0], parts[1]) not in seen:
                seen.add((parts[0], parts[1]))
                yield parts[0], parts[1]


def recover_interrupted(control: ControlPlane) -> dict[str, Any]:
    """End every operation whose execution is no longer running; remove what ended ones left.

    Returns ``RecoveredOperations`` (what was ended, with ``Status`` and ``FailureReason``),
    ``RunningOperations`` (left alone), ``LeftoversRemoved`` and, when any, ``Errors``.
    Idempotent: a second pass finds nothing to end and removes only what late steps wrote.
    """
    from cachevault.core.handler import metrics

    try:
        return Recovery(control).run()
    finally:
        metrics.clear_metrics()  # counted by the failure steps; nothing flushes them outside a Lambda


def recover_at_start(stack: StackInfo) -> dict[str, Any]:
    """The local environment's start: end what the previous embedded AWS left running. Never raises."""
    try:
        report = recover_interrupted(ControlPlane(stack))
    except Exception:  # the environment must start even if recovery cannot run
        log.exception("recovery at start failed")
        return {"Errors": ["recovery at start failed (see the log)"]}
    if report["RecoveredOperations"] or report["LeftoversRemoved"] or report.get("Errors"):
        log.warning("recovered at start: %s", json.dumps(report, default=str))
    return report

