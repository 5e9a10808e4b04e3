"""Failure steps never crash: each MarkFailed handler (functions/<name>/app.py, invoked through the
embedded Lambda API with the event its state machine gives it) succeeds when what it cleans up
is already gone and hands the snapshot back to ``available``. The handlers run in the local
Lambda runtime with every restriction on (read-only file system but a private /tmp), so a step
that wrote anywhere else would fail here as it would on AWS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from cachevault.catalog import caches, storage
from cachevault.core.timeutil import iso
from cachevault_tools.local import invoke, lambda_runtime
from cachevault_tools.local.environment import find_template

from tests.product_fixtures import Product


def _error(kind: str, message: str) -> dict[str, str]:
    return {"Error": kind, "Cause": json.dumps({"errorMessage": message, "errorType": kind})}


def _run(product: Product, function: str, event: dict[str, Any]) -> dict[str, Any]:
    """Invoke the handler in its Lambda environment; it must succeed and report no cleanup error."""
    name = invoke.resolve_function(function, product.env.info.functions, find_template())
    assert lambda_runtime.RUNTIME.semantics_for(name) == lambda_runtime.LambdaSemantics()
    result = invoke.invoke(name, event)
    assert result.function_error is None, (function, result.payload)
    assert "CleanupErrors" not in result.payload, result.payload
    return result.payload


@pytest.fixture
def cleanup_names(product: Product) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    catalog = product.control.catalog
    for name in names:
        if catalog.find_snapshot(name) is not None:
            catalog.delete_snapshot_record(name)
        if catalog.find_cache(name) is not None:
            caches.delete_local_cache(name, product.settings)


def _snapshot_record(product: Product, name: str, cache: str, status: str, **extra: Any) -> None:
    product.control.catalog.create_snapshot(
        {
            "SnapshotName": name,
            "ReplicationGroupId": cache,
            "SnapshotStatus": status,
            "SnapshotSource": "manual",
            "SnapshotCreateTime": iso(),
            "NodeSnapshots": [{"NodeGroupId": "0001", "CacheNodeId": f"{cache}-0001-001"}],
            **extra,
        }
    )


def _aborted_upload(product: Product, key: str) -> None:
    upload = product.s3.create_multipart_upload(Bucket=product.bucket, Key=key)
    product.s3.abort_multipart_upload(Bucket=product.bucket, Key=key, UploadId=upload["UploadId"])


def test_snapshot_mark_failed_with_cache_objects_and_uploads_gone(
    product: Product, cleanup_names: list[str]
) -> None:
    catalog = product.control.catalog
    cache = caches.create_local_cache("fs-cache", replicas=0, settings=product.settings)
    cleanup_names += ["fs-snap", "fs-cache"]
    execution = "snapshot-fs-snap-0123abcd"
    catalog.lock_cache("fs-cache", owner="fs-snap", operation="CreateSnapshot")
    _snapshot_record(product, "fs-snap", "fs-cache", "creating", ExecutionName=execution)
    _aborted_upload(product, storage.rdb_key("fs-snap", 1))  # the capture's upload: already aborted
    caches.delete_local_cache(cache["CacheName"], product.settings)  # nodes and cache record gone
    event = {
        "State": {"SnapshotName": "fs-snap", "ReplicationGroupId": "fs-cache", "SnapshotSource": "manual",
                  "Error": _error("CaptureFailed", "the source node went away")},
        "ExecutionName": execution,
    }  # fmt: skip
    out = _run(product, "snapshot_fail", event)
    assert out["SnapshotStatus"] == "failed"
    assert catalog.get_snapshot("fs-snap")["SnapshotStatus"] == "failed"
    assert product.s3_keys(storage.snapshot_prefix("fs-snap")) == []
    assert storage.rdb_key("fs-snap", 1) not in product.multipart_uploads()
    # A retried MarkFailed: everything is gone now, still a success.
    assert _run(product, "snapshot_fail", event)["SnapshotStatus"] == "failed"
    # The record itself gone (deleted meanwhile): nothing of ours to fail.
    catalog.delete_snapshot_record("fs-snap")
    assert _run(product, "snapshot_fail", event)["SnapshotStatus"] is None


def test_restore_mark_failed_with_snapshot_nodes_and_work_objects_gone(
    product: Product, cleanup_names: list[str]
) -> None:
    catalog = product.control.catalog
    cleanup_names += ["fr-snap", "fr-target"]
    execution = "restore-fr-target-0123abcd"
    _snapshot_record(product, "fr-snap", "fr-source", "restoring")
    catalog.register_cache(
        {"CacheName": "fr-target", "Status": "creating", "Managed": "local", "RestoreExecution": execution,
         "RestoreSource": "fr-snap", "SnapshotRestoring": "fr-snap"}
    )  # fmt: skip
    # One LoadShard left its result; the others never ran. No node was ever started.
    work = storage.restore_work_key("fr-target", execution, 1)
    product.s3.put_object(Bucket=product.bucket, Key=work, Body=b"{}")
    event = {
        "State": {"Request": {"SnapshotName": "fr-snap", "ReplicationGroupId": "fr-target"},
                  "Error": _error("RestoreFailed", "Target 10.0.0.1:6379 closed the connection")},
        "ExecutionName": execution,
    }  # fmt: skip
    out = _run(product, "restore_fail", event)
    assert out["Status"] == "failed"
    assert catalog.get_cache("fr-target")["Status"] == "failed"
    assert catalog.get_snapshot("fr-snap")["SnapshotStatus"] == "available"  # handed back
    assert product.s3_keys(storage.restore_prefix("fr-target", execution)) == []
    # The snapshot was deleted meanwhile (and the work objects are gone): still a success.
    catalog.update_cache("fr-target", Status="creating")
    catalog.delete_snapshot_record("fr-snap")
    assert _run(product, "restore_fail", event)["Status"] == "failed"
    # The target's record is gone too: nothing of ours to undo.
    catalog.delete_cache("fr-target")
    assert _run(product, "restore_fail", event)["Status"] is None


def test_copy_mark_failed_with_target_bucket_and_records_gone(product: Product, cleanup_names: list[str]) -> None:
    catalog = product.control.catalog
    cleanup_names += ["fc-src", "fc-dst"]
    execution = "copy-fc-dst-0123abcd"
    # An export whose target bucket no longer exists.
    _snapshot_record(product, "fc-src", "fc-cache", "copying", CopyExecution=execution)
    export = {
        "State": {"SourceSnapshotName": "fc-src", "TargetSnapshotName": "fc-dst", "TargetBucket": "fc-no-such-bucket",
                  "Mode": "export", "Error": _error("States.TaskFailed", "AccessDenied")},
        "ExecutionName": execution,
    }  # fmt: skip
    _run(product, "snapshot_copy_fail", export)
    assert catalog.get_snapshot("fc-src")["SnapshotStatus"] == "available"
    # A catalog copy whose target objects and upload are gone, then whose target record is gone.
    catalog.update_snapshot("fc-src", SnapshotStatus="copying", CopyExecution=execution)
    _snapshot_record(product, "fc-dst", "fc-cache", "creating", ExecutionName=execution)
    _aborted_upload(product, storage.rdb_key("fc-dst", 1))
    copy = {"State": export["State"] | {"TargetBucket": None, "Mode": "copy"}, "ExecutionName": execution}
    _run(product, "snapshot_copy_fail", copy)
    assert catalog.get_snapshot("fc-src")["SnapshotStatus"] == "available"
    assert catalog.get_snapshot("fc-dst")["SnapshotStatus"] == "failed"
    catalog.update_snapshot("fc-src", SnapshotStatus="copying", CopyExecution=execution)
    catalog.delete_snapshot_record("fc-dst")
    _run(product, "snapshot_copy_fail", copy)
    assert catalog.get_snapshot("fc-src")["SnapshotStatus"] == "available"


def test_delete_cache_step_with_the_cache_already_gone(product: Product, cleanup_names: list[str]) -> None:
    """DeleteCache has no MarkFailed (a failed final snapshot leaves the cache); its last step
    is the one a retry re-runs: with the nodes and the record already gone it still succeeds."""
    cleanup_names += ["fd-final"]
    _snapshot_record(product, "fd-final", "fd-cache", "available")
    event = {"ReplicationGroupId": "fd-cache", "FinalSnapshotIdentifier": "fd-final"}
    out = _run(product, "delete_cache_finish", event)
    assert out["Status"] == "deleted"
