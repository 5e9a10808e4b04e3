"""Recovery of operations whose execution was stopped (StopExecution) before its Catch ran.

Real state machines, handlers, redis-server nodes and ECS tasks on the embedded AWS (server
mode, as ``cachevault local up``): captures run in ECS worker tasks (``InlineCaptureMaxSeconds=0``)
and loads too (``LoadInlineMaxBytes=0``), so a stopped execution leaves a worker running, as
StopExecution does on AWS. Each test first checks that a RUNNING operation is left alone, then
stops it, recovers, and checks that nothing is left and the source is usable again.

moto 5.2.1, observed here: StopExecution marks the program stopped, but DescribeExecution
says RUNNING until the state in flight returns (a Lambda invoke runs to its end; a Wait or a
``runTask.sync`` poll returns at once), so a Lambda step still in flight writes *before*
the recovery can see the execution ABORTED. On AWS the execution is ABORTED at once and that
step writes *after*: ``test_a_late_step_cannot_undo_a_recovery`` plays that order.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterator
from contextlib import redirect_stdout
from typing import Any

import pytest
from cachevault.catalog import caches, storage
from cachevault.core import stack as stack_info
from cachevault.core.aws import client, resource
from cachevault.core.errors import InvalidReplicationGroupState
from cachevault.core.timeutil import iso
from cachevault.nodes import restore_targets
from cachevault.ops import imports
from cachevault.ops.recovery import execution_arn, load_task_group, recover_interrupted
from cachevault.restore import steps as restore_steps
from cachevault.snapshot import capture_runner
from cachevault_tools.cli import main as cli_main
from moto.s3.models import S3Backend

from tests.product_fixtures import (
    Product,
    connect,
    fill,
    nothing_left,
    own_product,
    slow_down_saves,
    sync_replicas,
    wait_until,
)

WAIT_S = 90


@pytest.fixture(scope="module")
def product(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Product]:
    parameters = {"InlineCaptureMaxSeconds": "0", "LoadInlineMaxBytes": "0"}
    yield from own_product(tmp_path_factory, "cachevault-recovery-home", parameters)


def _stop(product: Product, arn: str) -> None:
    client("stepfunctions").stop_execution(executionArn=arn, error="Test.Stop", cause="stopped by the test")


def _status(product: Product, arn: str) -> str:
    return str(product.control.describe_execution(arn)["status"])


def _wait_aborted(product: Product, arn: str) -> None:
    status = wait_until(lambda: (s := _status(product, arn)) != "RUNNING" and s, WAIT_S, f"{arn} to end")
    if status != "ABORTED":
        events = client("stepfunctions").get_execution_history(executionArn=arn, maxResults=1000)["events"]
        last = [(e["type"], {k: v for k, v in e.items() if k.endswith("Details")}) for e in events[-6:]]
        raise AssertionError(f"{arn} {status}, not ABORTED: {product.control.describe_execution(arn)} {last}")


def _running(group: str) -> list[str]:
    return restore_targets.running_tasks_by_group().get(group, [])


def _only(report: dict[str, Any], operation: str) -> dict[str, Any]:
    (entry,) = [op for op in report["RecoveredOperations"] if op["Operation"] == operation]
    assert "CleanupErrors" not in entry and "Errors" not in report, report
    return entry


def _left_alone(report: dict[str, Any], execution: str) -> None:
    assert [op["ExecutionName"] for op in report["RunningOperations"]] == [execution], report
    assert report["RecoveredOperations"] == [], report


def _reason(execution: str) -> str:
    return f"Interrupted: execution {execution} ABORTED before it finished"


# ------------------------------------------------------------------------------ (a) a capture
def test_a_stopped_capture_ends_failed_with_nothing_left(product: Product, new_cache: Any) -> None:
    cache = new_cache("rcap", replicas=1)
    name = cache["CacheName"]
    conn = connect(cache["Endpoints"][0])
    try:  # 40 MB of incompressible values: more than one 16 MiB part, so a multipart upload is open
        conn.mset({f"big:{i}": os.urandom(20_000) for i in range(2000)})
    finally:
        conn.close()
    sync_replicas(cache["Endpoints"][0], 1)
    replica = next(n["Address"] for n in cache["Nodes"] if n["Role"] == "replica")
    slow_down_saves([replica], 5000)  # ~10 s of save: the worker is mid-stream when the execution stops
    try:
        record = product.control.create_snapshot(name, "rcap-snap")
        arn, execution = record["ExecutionArn"], record["ExecutionName"]
        prefix = storage.snapshot_prefix("rcap-snap")

        def streaming() -> bool:
            node = (product.control.describe_snapshot("rcap-snap").get("NodeSnapshots") or [{}])[0]
            uploads = [k for k in product.multipart_uploads() if k.startswith(prefix)]
            return (
                node.get("CaptureStatus") == "running"
                and bool(uploads)
                and bool(_running(capture_runner.task_group("rcap-snap")))
            )

        wait_until(streaming, WAIT_S, "the capture worker streaming into its multipart upload")
        _left_alone(recover_interrupted(product.control), execution)
        assert product.control.catalog.get_snapshot("rcap-snap")["SnapshotStatus"] == "creating"
        assert product.control.catalog.get_cache(name)["LockedBy"] == "rcap-snap"

        _stop(product, arn)
        _wait_aborted(product, arn)
        assert _running(capture_runner.task_group("rcap-snap"))  # the worker outlives its execution

        entry = _only(recover_interrupted(product.control), "CreateSnapshot")
        assert entry["SnapshotName"] == "rcap-snap" and entry["ExecutionStatus"] == "ABORTED"
        assert entry["Status"] == "failed" and entry["FailureReason"] == _reason(execution)
        record = product.control.catalog.get_snapshot("rcap-snap")
        assert record["SnapshotStatus"] == "failed" and record["FailureReason"] == _reason(execution)
        assert "LockedBy" not in product.control.catalog.get_cache(name)
        wait_until(lambda: not _running(capture_runner.task_group("rcap-snap")), WAIT_S, "the worker to stop")

        # Again, once the worker is gone: nothing more to end; whatever it wrote on its way out is removed.
        again = recover_interrupted(product.control)
        assert again["RecoveredOperations"] == [] and "Errors" not in again, again
        nothing_left(product, "rcap-snap")
        assert product.control.catalog.capture_progress("rcap-snap") == {}
    finally:
        slow_down_saves([replica], 0)
    # The cache takes snapshots again (its lock is free).
    product.control.create_snapshot(name, "rcap-again")
    assert product.control.wait_snapshot("rcap-again", timeout_s=WAIT_S)["SnapshotStatus"] == "available"


# ------------------------------------------------------------------------------ (b) a resharding restore
@pytest.fixture
def source_snapshot(product: Product, new_cache: Any) -> str:
    cache = new_cache("rsrc", replicas=0)
    fill(cache["Endpoints"][0], keys=3000)
    name = f"{cache['CacheName']}-snap"
    product.control.create_snapshot(cache["CacheName"], name)
    assert product.control.wait_snapshot(name, timeout_s=WAIT_S)["SnapshotStatus"] == "available"
    return name


def test_a_stopped_resharding_restore_is_torn_down_and_its_snapshot_handed_back(
    product: Product, source_snapshot: str
) -> None:
    arn, target = product.control.restore(
        "rres-target", snapshot=source_snapshot, num_shards=2, cluster_mode="enabled", replicas=0
    )
    execution = arn.rsplit(":", 1)[1]
    try:
        record = wait_until(
            lambda: (c := product.control.catalog.find_cache(target)) and len(c.get("Nodes") or []) == 2 and c,
            WAIT_S,
            "the new cache's two primaries",
        )
        holds = [connect(e) for e in record["Endpoints"]]
        for hold in holds:  # the load worker blocks on its first RESTORE batch: the load stays in flight
            hold.execute_command("CLIENT", "PAUSE", 60000, "WRITE")

        def loading() -> bool:
            parts = product.control.catalog.operation_progress("restore", target)
            return any(p.get("Phase") == "load" and p.get("Status") == "running" for p in parts.values())

        wait_until(loading, WAIT_S, "the load to start")
        _left_alone(recover_interrupted(product.control), execution)
        assert product.control.catalog.get_cache(target)["Status"] == "creating"
        assert product.control.catalog.get_snapshot(source_snapshot)["SnapshotStatus"] == "restoring"
        # Deleting a cache a restore is creating is refused (ElastiCache too), with or without a final snapshot.
        for final in (None, "rres-final"):
            with pytest.raises(InvalidReplicationGroupState, match="is not in available state") as refused:
                product.control.delete_cache(target, final_snapshot=final)
            assert refused.value.code == "InvalidReplicationGroupStateFault"
        assert len(product.running_tasks(target)) == 2  # nothing was stopped

        _stop(product, arn)
        _wait_aborted(product, arn)
        assert _running(load_task_group(execution))  # the load worker outlives its execution

        entry = _only(recover_interrupted(product.control), "RestoreSnapshot")
        assert entry["ReplicationGroupId"] == target and entry["SnapshotName"] == source_snapshot
        assert entry["Status"] == "failed" and entry["FailureReason"] == _reason(execution)
        cache = product.control.catalog.get_cache(target)
        assert cache["Status"] == "failed" and cache["FailureReason"] == _reason(execution)
        assert cache["Nodes"] == [] and cache["Endpoints"] == []  # never available, never unverified nodes
        wait_until(lambda: not product.running_tasks(target), WAIT_S, "the target's node tasks to stop")
        wait_until(lambda: not _running(load_task_group(execution)), WAIT_S, "the load worker to stop")
        for hold in holds:
            hold.close()

        again = recover_interrupted(product.control)
        assert again["RecoveredOperations"] == [] and "Errors" not in again, again
        assert product.s3_keys(f"{storage.RESTORES_PREFIX}{target}/") == []
        assert product.control.catalog.operation_progress("restore", target) == {}
        assert product.control.catalog.get_snapshot(source_snapshot)["SnapshotStatus"] == "available"
    finally:
        if product.control.catalog.find_cache(target):
            caches.delete_local_cache(target, product.settings)  # a failed target is deletable
    # The snapshot restores again (and the name is free again).
    arn, target = product.control.restore(target, snapshot=source_snapshot, replicas=0)
    try:
        assert product.control.wait_restore(arn, target, timeout_s=WAIT_S)["Status"] == "available"
    finally:
        caches.delete_local_cache(target, product.settings)


def test_a_late_step_cannot_undo_a_recovery(product: Product, source_snapshot: str) -> None:
    """AWS's order: the execution is ABORTED while a step runs; that step ends after the recovery."""
    arn, target = product.control.restore("rlate", snapshot=source_snapshot, replicas=0)
    execution = arn.rsplit(":", 1)[1]
    try:
        record = wait_until(
            lambda: (c := product.control.catalog.find_cache(target)) and c.get("Nodes") and c, WAIT_S, "the nodes"
        )
        hold = connect(record["Endpoints"][0])
        hold.execute_command("CLIENT", "PAUSE", 60000, "WRITE")
        _stop(product, arn)
        _wait_aborted(product, arn)
        assert _only(recover_interrupted(product.control), "RestoreSnapshot")["Status"] == "failed"
        hold.close()

        # The steps that were (or could have been) in flight, finishing now:
        late_complete = {"ReplicationGroupId": target, "TargetType": "ecs", "ExecutionName": execution,
                         "SnapshotName": source_snapshot}  # fmt: skip
        with pytest.raises(InvalidReplicationGroupState, match="is not 'creating'"):
            restore_steps.complete_step(late_complete)
        assert product.control.catalog.get_cache(target)["Status"] == "failed"
        late_result = storage.restore_work_key(target, execution, 1)
        product.s3.put_object(Bucket=product.bucket, Key=late_result, Body=b"{}")
        product.control.catalog.set_operation_progress("restore", target, "load-0001", {"Status": "done"})

        swept = recover_interrupted(product.control)
        assert swept["RecoveredOperations"] == [] and "Errors" not in swept, swept
        assert f"progress restore#{target}" in swept["LeftoversRemoved"]
        assert any(storage.restore_prefix(target, execution) in item for item in swept["LeftoversRemoved"])
        assert product.s3_keys(f"{storage.RESTORES_PREFIX}{target}/") == []
        assert product.control.catalog.operation_progress("restore", target) == {}
        assert product.control.catalog.get_snapshot(source_snapshot)["SnapshotStatus"] == "available"
    finally:
        if product.control.catalog.find_cache(target):
            caches.delete_local_cache(target, product.settings)


# ------------------------------------------------------------------------------ (c) a copy, through the CLI
class CopyGate:
    """CopyObject into ``prefix`` waits (server side, bounded) until the test opens the gate."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
        self.entered, self.opened = threading.Event(), threading.Event()
        real = S3Backend.copy_object
        gate = self

        def copy_object(self: S3Backend, src_key: Any, dest_bucket_name: str, dest_key_name: str, *a: Any,
                        **kw: Any) -> Any:  # fmt: skip
            if dest_key_name.startswith(prefix):
                gate.entered.set()
                gate.opened.wait(WAIT_S)
            return real(self, src_key, dest_bucket_name, dest_key_name, *a, **kw)

        monkeypatch.setattr(S3Backend, "copy_object", copy_object)


def _cli_recover(product: Product) -> dict[str, Any]:
    """``cachevault recover --json`` (in this process: the stack file names this process's embedded AWS)."""
    stack_info.save_local(product.env.info, product.settings)
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli_main(["recover", "--json"])
    report = json.loads(out.getvalue())
    assert code == (1 if report.get("Errors") else 0)
    return report


def test_a_stopped_copy_fails_its_target_and_frees_its_source(
    product: Product, new_cache: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = new_cache("rcsrc", replicas=0)
    fill(cache["Endpoints"][0], keys=1000)
    product.control.create_snapshot(cache["CacheName"], "rcopy-src")
    assert product.control.wait_snapshot("rcopy-src", timeout_s=WAIT_S)["SnapshotStatus"] == "available"
    gate = CopyGate(monkeypatch, storage.snapshot_prefix("rcopy-dst"))
    try:
        started = product.control.copy_snapshot("rcopy-src", "rcopy-dst")
        arn = started["ExecutionArn"]
        execution = arn.rsplit(":", 1)[1]
        assert gate.entered.wait(WAIT_S), "the copy never reached CopyObject"
        _left_alone(_cli_recover(product), execution)
        source = product.control.catalog.get_snapshot("rcopy-src")
        assert source["SnapshotStatus"] == "copying" and source["CopyTarget"] == "rcopy-dst"
        assert product.control.catalog.get_snapshot("rcopy-dst")["SnapshotStatus"] == "creating"

        _stop(product, arn)
        # moto: RUNNING until the CopyObject step in flight returns (it writes its object first).
        assert _status(product, arn) == "RUNNING"
    finally:
        gate.opened.set()
    _wait_aborted(product, arn)

    report = _cli_recover(product)
    entry = _only(report, "CopySnapshot")
    assert entry["SourceSnapshotName"] == "rcopy-src" and entry["TargetSnapshotName"] == "rcopy-dst"
    assert entry["Status"] == "failed" and entry["FailureReason"] == _reason(execution)
    target = product.control.catalog.get_snapshot("rcopy-dst")
    assert target["SnapshotStatus"] == "failed" and target["FailureReason"] == _reason(execution)
    nothing_left(product, "rcopy-dst")
    assert product.control.catalog.operation_progress("copy", "rcopy-dst") == {}
    source = product.control.catalog.get_snapshot("rcopy-src")
    assert source["SnapshotStatus"] == "available"
    assert not {"CopyExecution", "CopyTarget", "CopyTargetBucket"} & set(source)
    again = _cli_recover(product)
    assert again["RecoveredOperations"] == [] and again["LeftoversRemoved"] == [], again

    # The source copies again, and the failed target's name can be deleted and reused.
    product.control.delete_snapshot("rcopy-dst")
    result = product.control.copy_snapshot("rcopy-src", "rcopy-dst", wait=True, timeout_s=WAIT_S)
    assert result["SnapshotStatus"] == "available"


# ------------------------------------------------------------------------------ executions that no longer exist
def test_records_whose_execution_no_longer_exists_are_ended(product: Product, new_cache: Any) -> None:
    """What a restart of the embedded AWS leaves (durable records, executions gone), end to end but the restart."""
    catalog, s3, bucket = product.control.catalog, product.s3, product.bucket
    locked, stale = new_cache("rgone", replicas=0)["CacheName"], new_cache("rgone", replicas=0)["CacheName"]
    ghost = "snapshot-gone-snap-deadbeef"
    catalog.lock_cache(locked, owner="gone-snap", operation="snapshot")
    catalog.create_snapshot({"SnapshotName": "gone-snap", "ReplicationGroupId": locked, "SnapshotStatus": "creating",
                             "SnapshotSource": "manual", "ExecutionName": ghost, "SnapshotCreateTime": iso(),
                             "NodeSnapshots": []})  # fmt: skip
    s3.put_object(Bucket=bucket, Key=storage.rdb_key("gone-snap", 1), Body=b"REDIS0011 partial")
    s3.create_multipart_upload(Bucket=bucket, Key=storage.rdb_key("gone-snap", 2))
    catalog.set_capture_progress("gone-snap", "0001", {"CaptureStatus": "running"})
    catalog.lock_cache(stale, owner="never-made", operation="snapshot")  # preflight died before the record
    restore = "restore-gone-target-deadbeef"
    catalog.register_cache({"CacheName": "gone-target", "Status": "creating", "Managed": "ecs",
                            "RestoreExecution": restore, "RestoreSource": "held-snap", "Nodes": []})  # fmt: skip
    catalog.create_snapshot({"SnapshotName": "held-snap", "ReplicationGroupId": locked, "SnapshotStatus": "restoring",
                             "SnapshotSource": "manual", "SnapshotCreateTime": iso(), "NodeSnapshots": []})  # fmt: skip
    s3.put_object(Bucket=bucket, Key=storage.restore_sources_key("gone-target", restore), Body=b"[]")
    catalog.create_snapshot({"SnapshotName": "half-deleted", "ReplicationGroupId": locked, "SnapshotStatus": "deleting",
                             "SnapshotSource": "manual", "SnapshotCreateTime": iso(), "NodeSnapshots": []})  # fmt: skip
    s3.put_object(Bucket=bucket, Key=storage.manifest_key("half-deleted"), Body=b"{}")
    ghost_import = "import-gone-import-deadbeef"  # an S3 import whose restore's execution and target are gone
    imports_table = resource("dynamodb").Table(product.settings.imports_table)
    machine = product.env.info.state_machine("RestoreSnapshotStateMachine")
    imports_table.put_item(Item={"ImportId": "imp-gone", "Bucket": bucket, "Key": "imports/gone.rdb",
                                 "CacheName": "gone-import", "Status": "restoring", "ImportTime": iso(),
                                 "ExecutionName": ghost_import,
                                 "ExecutionArn": execution_arn(machine, ghost_import)})  # fmt: skip
    try:
        report = recover_interrupted(product.control)
        assert "Errors" not in report and report["RunningOperations"] == [], report
        gone = f"Interrupted: execution {ghost} no longer exists (the embedded AWS was restarted, or its history "
        gone += "expired)"
        (failed,) = [op for op in report["RecoveredOperations"] if op.get("ExecutionName") == ghost]
        assert failed["Status"] == "failed" and failed["FailureReason"] == gone and failed["ExecutionStatus"] == "GONE"
        assert catalog.get_snapshot("gone-snap")["FailureReason"] == gone
        nothing_left(product, "gone-snap")
        assert catalog.capture_progress("gone-snap") == {}
        assert "LockedBy" not in catalog.get_cache(locked) and "LockedBy" not in catalog.get_cache(stale)
        target = catalog.get_cache("gone-target")
        assert target["Status"] == "failed" and f"execution {restore} no longer exists" in target["FailureReason"]
        assert product.s3_keys(f"{storage.RESTORES_PREFIX}gone-target/") == []
        assert catalog.get_snapshot("held-snap")["SnapshotStatus"] == "available"  # no live restore holds it
        assert catalog.find_snapshot("half-deleted") is None and product.s3_keys("snapshots/half-deleted/") == []
        assert {(op["Operation"], op["Status"]) for op in report["RecoveredOperations"]} >= {
            ("RestoreSnapshot", "failed"), ("RestoreSnapshot", "available"), ("DeleteSnapshot", "deleted"),
            ("CreateSnapshot", "unlocked"),
        }  # fmt: skip
        settled = imports.describe_import("imp-gone", product.settings)
        assert settled["Status"] == "failed"
        assert f"execution {ghost_import} no longer exists" in settled["FailureReason"]
        again = recover_interrupted(product.control)
        assert again == {"RecoveredOperations": [], "RunningOperations": [], "LeftoversRemoved": []}
    finally:
        imports_table.delete_item(Key={"ImportId": "imp-gone"})
        for name in ("gone-snap", "held-snap", "half-deleted"):
            catalog.delete_snapshot_record(name)
        if catalog.find_cache("gone-target"):
            caches.delete_local_cache("gone-target", product.settings)
