"""Delete with a final snapshot: the DeleteCache state machine against real caches.

The final snapshot is taken from each shard's primary; the cache goes only once the
snapshot is available. The failure is a real one: the primary's ACL refuses the
replication handshake (PSYNC/SYNC), so the capture fails while the cache keeps serving.
(``client-output-buffer-limit replica`` does not break an ``rdb-only`` capture: measured,
the RDB bypasses the replica output buffer.)
"""

from __future__ import annotations

from typing import Any

import pytest
from cachevault.catalog import storage
from cachevault.core.aws import client
from cachevault.core.errors import FinalSnapshotFailed, ReplicationGroupNotFoundFault, SnapshotAlreadyExistsFault
from cachevault_tools.local.redis_process import process_alive

from tests.product_fixtures import Product, connect, fill, node_addresses, sync_replicas

DELETE_CACHE = "DeleteCacheStateMachine"


def pids(product: Product, cache: str) -> list[int]:
    return product.node_pids(cache)


def executions(product: Product, cache: str, status: str) -> list[dict[str, Any]]:
    sfn = client("stepfunctions")
    listing = sfn.list_executions(
        stateMachineArn=product.control.stack.state_machine(DELETE_CACHE), statusFilter=status
    )
    return [e for e in listing["executions"] if e["name"].startswith(f"delete-{cache}-")]


def test_final_snapshot_from_primary_then_cache_gone(product: Product, new_cache: Any) -> None:
    cache = new_cache("del-ok", replicas=1)
    name = cache["CacheName"]
    primary = node_addresses(cache, "primary")[0]
    fill(primary, keys=500)
    sync_replicas(primary, 1)
    nodes = pids(product, name)
    assert len(nodes) == 2 and all(process_alive(p) for p in nodes)
    seen: list[str] = []

    result = product.control.delete_cache(
        name, final_snapshot=f"{name}-Final", progress=lambda r: seen.append(r["SnapshotStatus"])
    )

    final = result["FinalSnapshot"]
    assert result["Status"] == "deleted" and result["CacheName"] == name
    assert final["SnapshotName"] == f"{name}-final" and final["SnapshotStatus"] == "available"
    assert final["FinalSnapshot"] is True
    assert [n["SourceRole"] for n in final["NodeSnapshots"]] == ["primary"]
    assert final["NodeSnapshots"][0]["KeyCount"] == 500
    assert product.s3_keys(storage.snapshot_prefix(final["SnapshotName"])) == sorted(
        [storage.rdb_key(final["SnapshotName"], 1), storage.manifest_key(final["SnapshotName"])]
    )
    assert product.control.catalog.find_cache(name) is None
    assert not any(process_alive(p) for p in nodes)
    assert "creating" in seen  # progress was reported while the snapshot ran
    assert len(executions(product, name, "SUCCEEDED")) == 1


def test_failed_final_snapshot_keeps_the_cache_and_a_retry_succeeds(product: Product, new_cache: Any) -> None:
    cache = new_cache("del-fail", replicas=1)
    name, final = cache["CacheName"], f"{cache['CacheName']}-final"
    primary = node_addresses(cache, "primary")[0]
    fill(primary, keys=300)
    conn = connect(primary)
    conn.set("marker", "still-here")
    sync_replicas(primary, 1)
    nodes = pids(product, name)
    # The fault: the primary refuses the replication handshake the capture needs.
    conn.execute_command("ACL", "SETUSER", "default", "-psync", "-sync")
    try:
        with pytest.raises(FinalSnapshotFailed) as failure:
            product.control.delete_cache(name, final_snapshot=final)
        assert "was not deleted" in str(failure.value) and "NOPERM" in str(failure.value)

        record = product.control.catalog.get_snapshot(final)
        assert record["SnapshotStatus"] == "failed"
        assert "PSYNC" in record["FailureReason"] and "NOPERM" in record["FailureReason"]
        failed = executions(product, name, "FAILED")
        assert len(failed) == 1
        described = client("stepfunctions").describe_execution(executionArn=failed[0]["executionArn"])
        assert described["error"] == "FinalSnapshotFailed"
        # The cache is intact: registered, unlocked, every node alive, answering.
        kept = product.control.catalog.get_cache(name)
        assert kept["Status"] == "available" and not kept.get("LockedBy")
        assert all(process_alive(p) for p in nodes)
        assert conn.ping() is True and conn.get("marker") == b"still-here"
        assert conn.dbsize() == 301
    finally:
        conn.execute_command("ACL", "SETUSER", "default", "+psync", "+sync")
        conn.close()

    # Retry with the same name: the failed final snapshot is replaced.
    result = product.control.delete_cache(name, final_snapshot=final)
    assert result["FinalSnapshot"]["SnapshotStatus"] == "available"
    assert result["FinalSnapshot"]["NodeSnapshots"][0]["KeyCount"] == 301
    assert product.control.catalog.find_cache(name) is None
    assert not any(process_alive(p) for p in nodes)


def test_existing_snapshot_name_is_refused_and_plain_delete_is_synchronous(product: Product, new_cache: Any) -> None:
    cache = new_cache("del-plain", replicas=0)
    name = cache["CacheName"]
    product.control.catalog.create_snapshot(
        {
            "SnapshotName": f"{name}-taken",
            "ReplicationGroupId": "someone-else",
            "SnapshotStatus": "available",
            "SnapshotSource": "manual",
            "SnapshotCreateTime": "2031-01-01T00:00:00.000Z",
            "NodeSnapshots": [],
        }
    )
    with pytest.raises(SnapshotAlreadyExistsFault):
        product.control.delete_cache(name, final_snapshot=f"{name}-taken")
    assert product.control.catalog.get_cache(name)["Status"] == "available"
    assert executions(product, name, "RUNNING") == [] and executions(product, name, "FAILED") == []

    nodes = pids(product, name)
    result = product.control.delete_cache(name)
    assert result == {"CacheName": name, "Status": "deleted"}
    assert not any(process_alive(p) for p in nodes)
    with pytest.raises(ReplicationGroupNotFoundFault):
        product.control.catalog.get_cache(name)


def test_deleting_a_cache_removes_its_automatic_snapshots_and_keeps_manual_ones(
    product: Product, new_cache: Any
) -> None:
    cache = new_cache("del-auto", replicas=1)
    name = cache["CacheName"]
    fill(node_addresses(cache, "primary")[0], keys=200)
    automatic = f"automatic.{name}-2026-11-24-05-00"
    product.control.create_snapshot(name, automatic, source="automated")
    product.control.wait_snapshot(automatic, timeout_s=60)
    product.control.create_snapshot(name, f"{name}-manual")
    product.control.wait_snapshot(f"{name}-manual", timeout_s=60)
    assert product.s3_keys(storage.snapshot_prefix(automatic))

    result = product.control.delete_cache(name)

    assert result["Status"] == "deleted" and product.control.catalog.find_cache(name) is None
    # As ElastiCache's DeleteReplicationGroup: automatic snapshots go with the cache...
    assert product.control.catalog.find_snapshot(automatic) is None
    assert product.s3_keys(storage.snapshot_prefix(automatic)) == []
    # ...manual snapshots stay, objects and all.
    manual = product.control.catalog.get_snapshot(f"{name}-manual")
    assert manual["SnapshotStatus"] == "available"
    assert product.s3_keys(storage.snapshot_prefix(f"{name}-manual"))
