"""CreateSnapshot end to end: the real state machine, handlers and redis-server nodes.

Every test goes through ``ControlPlane`` (what the CLI and the HTTP API use), so the
template's state machine, the embedded Lambda runtime, DynamoDB and S3 are all real
parts of the path; the caches are real redis-server processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cachevault.catalog import storage
from cachevault.core.errors import InvalidParameterCombination, InvalidParameterValue, InvalidSnapshotState
from cachevault_tools import datagen
from cachevault_tools.local import ecs
from cachevault_tools.local.redis_process import process_alive

from tests.product_fixtures import (
    Product,
    check_rdb,
    connect,
    digest_of_rdb,
    download,
    fill,
    fill_cluster,
    fork_stats,
    host_port,
    node_addresses,
    node_digest,
    node_id_at,
    nothing_left,
    object_sha256,
    slow_down_saves,
    sync_replicas,
    wait_until,
)


# ------------------------------------------------------------------------------ 1
def test_cluster_mode_disabled_snapshot_from_replica(product: Product, new_cache: Any, tmp_path: Path) -> None:
    cache = new_cache("cmd", replicas=2)
    primary = cache["Endpoints"][0]
    fill(primary, keys=3000)
    sync_replicas(primary, 2)
    source_digest, source_keys = node_digest(primary)
    before = fork_stats(primary)

    started = product.control.create_snapshot(cache["CacheName"], "MySnap")
    assert started["SnapshotName"] == "mysnap"  # stored lowercase, as ElastiCache does
    assert started["SnapshotStatus"] == "creating"
    record = product.control.wait_snapshot("mysnap", timeout_s=60)

    assert record["SnapshotStatus"] == "available"
    assert record["SnapshotSource"] == "manual"
    assert record["ReplicationGroupId"] == cache["CacheName"]
    assert record["NumNodeGroups"] == 1
    node = record["NodeSnapshots"][0]
    replica_ids = {n["CacheNodeId"] for n in cache["Nodes"] if n["Role"] == "replica"}
    assert node["CacheNodeId"] in replica_ids
    assert node["SourceRole"] == "replica"
    # The primary never forked: the capture's fork ran on the replica.
    assert fork_stats(primary) == before

    key = "snapshots/mysnap/mysnap-0001.rdb"
    assert node["S3Key"] == key
    rdb = download(product, key, tmp_path / "mysnap.rdb")
    checked = check_rdb(rdb)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "RDB looks OK" in checked.stdout
    assert digest_of_rdb(rdb, tmp_path / "check-node") == (source_digest, source_keys)
    assert int(record["CacheSize"]) == rdb.stat().st_size == int(node["Size"])

    manifest = storage.read_manifest(product.s3, product.bucket, "mysnap")
    assert manifest["Engine"] == cache["Engine"] == "redis"
    assert manifest["EngineVersion"] == cache["EngineVersion"]
    assert manifest["RdbVersion"] == 10  # redis 7.0
    assert manifest["CacheNodeType"] == cache["CacheNodeType"]
    assert manifest["ClusterMode"] is False
    assert manifest["NumNodeGroups"] == 1
    assert manifest["SnapshotCreateTime"] == record["SnapshotCreateTime"]
    [entry] = manifest["NodeSnapshots"]
    assert entry["S3Key"] == key
    assert entry["Sha256"] == hashlib.sha256(rdb.read_bytes()).hexdigest()
    assert entry["Sha256"] == object_sha256(product.s3, product.bucket, key)
    assert entry["CacheSize"] == rdb.stat().st_size
    assert entry["KeyCount"] == source_keys
    assert entry["CacheNodeId"] == node["CacheNodeId"]
    assert len(entry["ReplicationId"]) == 40 and entry["ReplicationOffset"] > 0
    assert entry["CaptureStartTime"] <= entry["CaptureEndTime"]
    assert record["ManifestKey"] == "snapshots/mysnap/manifest.json"
    assert "LockedBy" not in product.control.catalog.get_cache(cache["CacheName"])


# ------------------------------------------------------------------------------ 2
def test_three_shard_cluster_snapshot(product: Product, new_cache: Any, tmp_path: Path) -> None:
    cache = new_cache("cme", cluster_mode=True, num_shards=3, replicas=1)
    fill_cluster(cache, keys=3000)
    for endpoint in cache["Endpoints"]:
        sync_replicas(endpoint, 1)
    digests = [node_digest(endpoint) for endpoint in cache["Endpoints"]]
    assert all(keys > 0 for _, keys in digests)

    product.control.create_snapshot(cache["CacheName"], "shards3")
    record = product.control.wait_snapshot("shards3", timeout_s=60)

    assert record["SnapshotStatus"] == "available"
    assert record["NumNodeGroups"] == 3
    assert record["ClusterMode"] is True
    slots = ["0-5460", "5461-10922", "10923-16383"]
    replicas = {n["CacheNodeId"]: n["NodeGroupId"] for n in cache["Nodes"] if n["Role"] == "replica"}
    manifest = storage.read_manifest(product.s3, product.bucket, "shards3")
    assert [n["Slots"] for n in manifest["NodeSnapshots"]] == slots
    assert product.s3_keys("snapshots/shards3/") == [
        "snapshots/shards3/manifest.json",
        "snapshots/shards3/shards3-0001.rdb",
        "snapshots/shards3/shards3-0002.rdb",
        "snapshots/shards3/shards3-0003.rdb",
    ]
    for index, node in enumerate(record["NodeSnapshots"]):
        group = f"{index + 1:04d}"
        assert node["NodeGroupId"] == group
        assert node["NodeGroupConfiguration"] == {"NodeGroupId": group, "Slots": slots[index]}
        assert replicas[node["CacheNodeId"]] == group  # taken from this shard's replica
        rdb = download(product, node["S3Key"], tmp_path / f"shard{index}.rdb")
        assert check_rdb(rdb).returncode == 0
        assert digest_of_rdb(rdb, tmp_path / f"check{index}") == digests[index]
        assert manifest["NodeSnapshots"][index]["Sha256"] == hashlib.sha256(rdb.read_bytes()).hexdigest()

    # Cluster mode enabled: snapshots are cluster-level; naming a node is refused up front.
    with pytest.raises(InvalidParameterCombination, match="cluster level"):
        product.control.create_snapshot(cache["CacheName"], "shard-level", source_node=next(iter(replicas)))
    assert product.control.catalog.find_snapshot("shard-level") is None
    nothing_left(product, "shard-level")
    assert "LockedBy" not in product.control.catalog.get_cache(cache["CacheName"])


# ------------------------------------------------------------------------------ 3
def test_writes_keep_flowing_during_capture(product: Product, new_cache: Any) -> None:
    cache = new_cache("wr", replicas=1)
    primary = cache["Endpoints"][0]
    fill(primary, keys=4000)
    datagen.generate(*host_port(primary), 4, seed=3)
    sync_replicas(primary, 1)
    # ~1.5 s of save on the replica, so the capture window is long enough to observe.
    keys = node_digest(primary)[1]
    slow_down_saves(node_addresses(cache, "replica"), max(1, 1_500_000 // keys))

    writes: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        conn = connect(primary)
        try:
            i = 0
            while not stop.is_set() and i < 100_000:
                conn.set(f"live:{i}", os.urandom(32))
                writes.append(time.monotonic())
                i += 1
                time.sleep(0.001)  # a steady client, not a GIL hog starving the state machine
        except BaseException as exc:  # the assertion below reports it
            errors.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        product.control.create_snapshot(cache["CacheName"], "under-load")

        def capture(status: str) -> float | None:
            node = (product.control.describe_snapshot("under-load")["NodeSnapshots"] or [{}])[0]
            return time.monotonic() if node.get("CaptureStatus") == status else None

        running_at = wait_until(lambda: capture("running"), 30, "the capture to start")
        done_at = wait_until(lambda: capture("done"), 60, "the capture to finish")
        record = product.control.wait_snapshot("under-load", timeout_s=60)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert errors == []
    assert record["SnapshotStatus"] == "available"
    during = [t for t in writes if running_at <= t <= done_at]
    assert done_at - running_at > 0.5
    assert len(during) > 100, f"only {len(during)} writes landed during the capture window"


# ------------------------------------------------------------------------------ 4
def test_source_node_choice(product: Product, new_cache: Any) -> None:
    cache = new_cache("src", replicas=2)
    fill(cache["Endpoints"][0], keys=200)
    replicas = [n["CacheNodeId"] for n in cache["Nodes"] if n["Role"] == "replica"]
    for wanted in replicas:
        name = f"pick-{wanted[-3:]}"
        product.control.create_snapshot(cache["CacheName"], name, source_node=wanted.upper())
        record = product.control.wait_snapshot(name, timeout_s=60)
        assert record["NodeSnapshots"][0]["CacheNodeId"] == wanted

    with pytest.raises(InvalidParameterValue, match="not a node of replication group"):
        product.control.create_snapshot(cache["CacheName"], "pick-stranger", source_node="someone-else-0001-001")
    assert product.control.catalog.find_snapshot("pick-stranger") is None
    nothing_left(product, "pick-stranger")


# ------------------------------------------------------------------------------ 6
def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


def test_source_killed_mid_capture_fails_cleanly_and_retry_succeeds(
    product: Product, new_cache: Any, tmp_path: Path
) -> None:
    cache = new_cache("kill", replicas=2)
    primary = cache["Endpoints"][0]
    datagen.generate(*host_port(primary), 48, seed=7)
    sync_replicas(primary, 2)
    digest = node_digest(primary)
    victim, survivor = node_addresses(cache, "replica")
    victim_id = node_id_at(cache, victim)
    # A save of ~6 s on the victim: the kill lands while it streams, after the first
    # 16 MiB part went up (so there is a multipart upload to clean away).
    slow_down_saves([victim], max(1, 6_000_000 // digest[1]))

    product.control.create_snapshot(cache["CacheName"], "doomed", source_node=victim_id)

    def streaming() -> bool:
        node = (product.control.describe_snapshot("doomed")["NodeSnapshots"] or [{}])[0]
        uploading = product.multipart_uploads() == ["snapshots/doomed/doomed-0001.rdb"]
        return uploading and node.get("CaptureStatus") == "running" and int(node.get("BytesCaptured", 0)) > 17 << 20

    wait_until(streaming, 30, "the capture to stream its first part")
    (victim_pid,) = ecs.RUNNER.pids(product.node_task(victim_id))
    save_children = _children(victim_pid)
    product.kill_node(victim_id)

    with pytest.raises(Exception, match="failed") as failure:
        product.control.wait_snapshot("doomed", timeout_s=60)
    record = product.control.describe_snapshot("doomed")
    assert record["SnapshotStatus"] == "failed"
    assert record["FailureReason"].startswith("CaptureFailed: ")
    assert victim_id in record["FailureReason"]
    assert record["FailureReason"] in str(failure.value)
    nothing_left(product, "doomed")
    assert "LockedBy" not in product.control.catalog.get_cache(cache["CacheName"])
    # The killed node's save child (if it had one) must not outlive it for long.
    for pid in save_children:
        wait_until(lambda pid=pid: not process_alive(pid), 15, f"save child {pid} to exit")

    product.control.create_snapshot(cache["CacheName"], "retry")
    retry = product.control.wait_snapshot("retry", timeout_s=60)
    assert retry["SnapshotStatus"] == "available"
    assert retry["NodeSnapshots"][0]["CacheNodeId"] == node_id_at(cache, survivor)
    rdb = download(product, retry["NodeSnapshots"][0]["S3Key"], tmp_path / "retry.rdb")
    assert digest_of_rdb(rdb, tmp_path / "retry-node") == digest


# ------------------------------------------------------------------------------ 7
def _fake_record(cache: str, name: str, minute: int, source: str = "manual") -> dict[str, Any]:
    return {
        "SnapshotName": name,
        "ReplicationGroupId": cache,
        "SnapshotStatus": "available",
        "SnapshotSource": source,
        "SnapshotCreateTime": f"2026-11-24T10:{minute:02d}:00.000Z",
        "NodeSnapshots": [],
    }


def test_list_pages_newest_first_and_filters_by_source(product: Product) -> None:
    catalog = product.control.catalog
    cache = "listing"
    for minute in range(25):
        source = "automated" if minute % 5 == 0 else "manual"
        prefix = f"automatic.{cache}-" if source == "automated" else "list-"
        catalog.create_snapshot(_fake_record(cache, f"{prefix}{minute:02d}", minute, source))
    catalog.create_snapshot(_fake_record("other-cache", "not-listing", 30))

    first = product.control.list_snapshots(cache=cache, max_records=20)
    assert len(first["Snapshots"]) == 20 and "Marker" in first
    second = product.control.list_snapshots(cache=cache, max_records=20, marker=first["Marker"])
    assert "Marker" not in second
    times = [s["SnapshotCreateTime"] for s in first["Snapshots"] + second["Snapshots"]]
    assert times == sorted(times, reverse=True) and len(set(times)) == 25
    assert {s["ReplicationGroupId"] for s in first["Snapshots"] + second["Snapshots"]} == {cache}

    automated = product.control.list_snapshots(cache=cache, source="automated", max_records=20)
    assert [s["SnapshotName"] for s in automated["Snapshots"]] == [
        f"automatic.{cache}-{m:02d}" for m in (20, 15, 10, 5, 0)
    ]
    manual: list[dict[str, Any]] = []
    marker = None
    for _ in range(5):  # 20 manual records: one full page, then at most an empty one
        page = product.control.list_snapshots(cache=cache, source="manual", max_records=20, marker=marker)
        manual += page["Snapshots"]
        marker = page.get("Marker")
        if not marker:
            break
    assert marker is None
    assert len(manual) == 20 and {s["SnapshotSource"] for s in manual} == {"manual"}
    with pytest.raises(InvalidParameterValue):
        product.control.list_snapshots(cache=cache, max_records=5)


def test_describe_progress_and_delete(product: Product, new_cache: Any) -> None:
    cache = new_cache("prog", replicas=1)
    primary = cache["Endpoints"][0]
    datagen.generate(*host_port(primary), 8, seed=5)
    sync_replicas(primary, 1)
    keys = node_digest(primary)[1]
    slow_down_saves(node_addresses(cache, "replica"), max(1, 2_500_000 // keys))

    product.control.create_snapshot(cache["CacheName"], "Progress")

    def progressing() -> dict[str, Any] | None:
        record = product.control.describe_snapshot("PROGRESS")
        node = (record["NodeSnapshots"] or [{}])[0]
        if node.get("CaptureStatus") == "running" and int(node.get("BytesCaptured", 0)) > 0:
            return record
        return None

    seen = wait_until(progressing, 30, "progress to show while creating")
    assert seen["SnapshotStatus"] == "creating"
    assert seen["NodeSnapshots"][0]["RateBytesPerSecond"] > 0
    with pytest.raises(InvalidSnapshotState, match="creating"):
        product.control.delete_snapshot("progress")

    record = product.control.wait_snapshot("progress", timeout_s=60)
    assert record["SnapshotStatus"] == "available"
    assert int(record["NodeSnapshots"][0]["Size"]) == int(record["CacheSize"])
    assert int(record["CacheSize"]) >= int(seen["NodeSnapshots"][0]["BytesCaptured"])
    listed = product.control.list_snapshots(cache=cache["CacheName"], max_records=20)["Snapshots"]
    assert [s["SnapshotName"] for s in listed] == ["progress"]
    assert len(product.s3_keys("snapshots/progress/")) == 2

    deleted = product.control.delete_snapshot("Progress")
    assert deleted["SnapshotStatus"] == "deleting"
    assert product.s3_keys("snapshots/progress/") == []
    assert product.control.catalog.find_snapshot("progress") is None
    assert product.control.list_snapshots(cache=cache["CacheName"], max_records=20)["Snapshots"] == []
    assert json.dumps(deleted)  # the answer is JSON-safe for the CLI/API
