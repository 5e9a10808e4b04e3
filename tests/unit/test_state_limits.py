"""Step Functions limits on the state machines of template.yaml: 256 KB payloads, 25,000 events.

The definitions are walked as deployed (tests/unit/asl_walk.py). Each Lambda is stood in for
by a function returning what the real step returns, in its shape and with worst-case values
(255-character snapshot names, 40-character cache names, long host names, the most warnings
preflight emits); the polling steps use the product's own ``polling.next_poll_seconds`` and
the restore's Verify its own ``_load_summary``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cachevault.catalog import storage
from cachevault.core import polling
from cachevault.nodes.slots import even_split, format_slot_ranges
from cachevault.ops.delete_steps import DEFAULT_MAX_POLLS
from cachevault.restore import steps as restore_workflow
from cachevault.snapshot import preflight

from tests.unit.asl_walk import HISTORY_LIMIT, PAYLOAD_LIMIT, Walk
from tests.unit.state_machines import definitions

DEFINITIONS = definitions()
SNAPSHOT = "s" * 255
CACHE = "c" * 40
EXECUTION = "snapshot-" + "x" * 70
DAY = 24 * 3600


def _host(i: int) -> str:
    return f"cache-node-{i:04d}.cachevault-private.eu-west-1.compute.internal"


# ------------------------------------------------------------------------------ CreateSnapshot
def snapshot_steps(shards: int, capture_seconds: float, *, adaptive: bool = True) -> dict[str, Any]:
    ranges = even_split(shards)
    low_memory = preflight.PreflightContext(request=None, cache={}, catalog=None)  # type: ignore[arg-type]
    low_memory.node_memory = {
        f"{CACHE}-{i:04d}-002": {"total_system_memory": 100, "maxmemory": 95} for i in range(1, shards + 1)
    }
    preflight.memory_headroom(low_memory)  # the real warnings of every node short of memory

    def snapshot_preflight(event: dict[str, Any], clock: float) -> dict[str, Any]:
        request = event["Request"]
        return {
            "SnapshotName": request["SnapshotName"],
            "ReplicationGroupId": request["ReplicationGroupId"],
            "SnapshotSource": "manual",
            "SourceNode": None,
            "FinalSnapshot": False,
            "PollSeconds": 2,
            "ExecutionName": event["ExecutionName"],
            "Warnings": low_memory.warnings,
        }

    def select_sources(event: dict[str, Any], clock: float) -> dict[str, Any]:
        return {
            **event,
            "Shards": [
                {
                    "ShardIndex": i,
                    "NodeGroupId": f"{i:04d}",
                    "Slots": format_slot_ranges([ranges[i - 1]]),
                    "Host": _host(i),
                    "Port": 6379,
                    "CacheNodeId": f"{CACHE}-{i:04d}-002",
                    "Role": "replica",
                    "ReplicationGroupId": CACHE,
                    # capture_runner.plan: half the shards too big for a Lambda run as ECS tasks
                    "Runner": "ecs" if i % 2 else "inline",
                    "PredictedBytes": 1 << 40,
                    "PredictedSeconds": 91625.968,
                }
                for i in range(1, shards + 1)
            ],
        }

    def start_capture(event: dict[str, Any], clock: float) -> dict[str, Any]:
        capture = {"Done": False, "StartedAt": "2026-11-24T22:15:49.692Z", "StartedAtEpoch": clock}
        return {**event, "Capture": {**capture, "NextPollSeconds": event["PollSeconds"]}}

    task_started: list[float] = []  # ECS tasks: when StartCaptureTask ran (every shard starts at once)

    def run_capture_task(event: dict[str, Any], clock: float) -> dict[str, Any]:
        environment = {e["Name"]: e["Value"] for e in event["Overrides"]["ContainerOverrides"][0]["Environment"]}
        assert json.loads(environment["CAPTURE_SHARD"])["Runner"] == "ecs"
        task_started.append(clock)
        arn = f"arn:aws:ecs:eu-west-1:123456789012:task/cachevault/{'f' * 32}"
        return {"Tasks": [{"TaskArn": arn, "LastStatus": "PROVISIONING", "Containers": [{"Name": "worker"}]}]}

    def poll_capture(event: dict[str, Any], clock: float) -> dict[str, Any]:
        # An ECS task's Capture comes from the CaptureTaskStarted Pass (an ISO StartedAt, no epoch).
        started = event["Capture"].get("StartedAtEpoch")
        if started is None:
            started = min(task_started)
        wait = polling.next_poll_seconds(started, event["PollSeconds"], now=clock) if adaptive else 2
        return {
            **event,
            "Capture": {
                "Done": clock - started >= capture_seconds,
                "Status": "running",
                "BytesCaptured": 1 << 40,
                "RateBytesPerSecond": 12_000_000,
                "StartedAtEpoch": started,
                "NextPollSeconds": wait,
            },
        }

    def finish_shard(event: dict[str, Any], clock: float) -> dict[str, Any]:
        return {"NodeGroupId": event["Shard"]["NodeGroupId"], "Size": 1 << 40}

    def write_manifest(event: dict[str, Any], clock: float) -> dict[str, Any]:
        return {**event, "ManifestKey": storage.manifest_key(event["SnapshotName"])}

    def mark_available(event: dict[str, Any], clock: float) -> dict[str, Any]:
        return {
            "SnapshotName": event["SnapshotName"],
            "ReplicationGroupId": event["ReplicationGroupId"],
            "SnapshotStatus": "available",
            "CacheSize": shards << 40,
            "Warnings": event["Warnings"],
        }

    return {
        "SnapshotPreflightFunction": snapshot_preflight,
        "SnapshotSelectSourcesFunction": select_sources,
        "CaptureStartFunction": start_capture,
        "runTask": run_capture_task,
        "CapturePollFunction": poll_capture,
        "CaptureFinishFunction": finish_shard,
        "SnapshotManifestFunction": write_manifest,
        "SnapshotCompleteFunction": mark_available,
    }


def walk_snapshot(shards: int, capture_seconds: float, *, adaptive: bool = True) -> Walk:
    walk = Walk(snapshot_steps(shards, capture_seconds, adaptive=adaptive), execution_name=EXECUTION)
    output = walk.run(
        DEFINITIONS["CreateSnapshotStateMachine"],
        {"SnapshotName": SNAPSHOT, "ReplicationGroupId": CACHE, "PollSeconds": 2},
    )
    assert output["SnapshotStatus"] == "available"
    return walk


@pytest.mark.parametrize("shards", [100, 500])
def test_snapshot_payloads_stay_under_256_kb(shards: int) -> None:
    walk = walk_snapshot(shards, capture_seconds=600)
    assert walk.largest < PAYLOAD_LIMIT, (walk.largest, walk.largest_at)
    assert walk.sizes["CaptureShards result"] > shards * 30  # the Map's gathered results were measured
    assert walk.sizes["WriteManifest input"] == walk.sizes["CaptureShards input"]  # and dropped (ResultPath null)


def test_a_24_hour_capture_of_16_shards_stays_under_the_history_limit() -> None:
    walk = walk_snapshot(16, capture_seconds=DAY)
    assert walk.clock >= DAY
    assert walk.events < 0.8 * HISTORY_LIMIT, walk.events
    # The same walk polling every 2 s (the old fixed Wait) would fail the execution within minutes.
    fixed = walk_snapshot(16, capture_seconds=15 * 60, adaptive=False)
    assert fixed.events > HISTORY_LIMIT


def test_a_short_capture_is_seen_done_soon_after() -> None:
    for seconds in (5, 60, 600, 3600):
        walk = walk_snapshot(1, capture_seconds=seconds)
        assert walk.clock <= seconds * (1 + polling.BACKOFF_FRACTION) + 2, (seconds, walk.clock)


# ------------------------------------------------------------------------------ DeleteCache
def test_a_final_snapshot_of_a_day_stays_under_the_history_limit() -> None:
    def start(event: dict[str, Any], clock: float) -> dict[str, Any]:
        return {
            "ReplicationGroupId": event["ReplicationGroupId"],
            "FinalSnapshotIdentifier": event["FinalSnapshotIdentifier"],
            "SnapshotExecutionArn": "arn:aws:states:us-east-1:123456789012:execution:cachevault-CreateSnapshot:"
            + EXECUTION,
            "SnapshotExecutionName": EXECUTION,
            "PollSeconds": event["PollSeconds"],
            "MaxPolls": event["MaxPolls"],
            "Polls": 0,
            "Done": False,
            "StartedAtEpoch": clock,
            "NextPollSeconds": event["PollSeconds"],
            "ExecutionName": event["ExecutionName"],
        }

    def poll(event: dict[str, Any], clock: float) -> dict[str, Any]:
        polls = event["Polls"] + 1
        assert polls < event["MaxPolls"], "the delete would give up on a snapshot still being taken"
        done = clock - event["StartedAtEpoch"] >= DAY
        wait = polling.next_poll_seconds(event["StartedAtEpoch"], event["PollSeconds"], now=clock)
        return {**event, "Polls": polls, "Done": done, "NextPollSeconds": wait}

    def finish(event: dict[str, Any], clock: float) -> dict[str, Any]:
        return {"CacheName": event["ReplicationGroupId"], "Status": "deleted"}

    walk = Walk(
        {"DeleteCacheStartFunction": start, "DeleteCachePollFunction": poll, "DeleteCacheFinishFunction": finish}
    )
    walk.run(
        DEFINITIONS["DeleteCacheStateMachine"],
        {
            "ReplicationGroupId": CACHE,
            "FinalSnapshotIdentifier": SNAPSHOT,
            "PollSeconds": 2,
            "MaxPolls": DEFAULT_MAX_POLLS,
        },
    )
    assert walk.clock >= DAY and walk.events < 0.2 * HISTORY_LIMIT, walk.events
    assert DEFAULT_MAX_POLLS * 9 < HISTORY_LIMIT  # even polls that never end fail cleanly first


# ------------------------------------------------------------------------------ RestoreSnapshot
def restore_steps(sources: int) -> dict[str, Any]:
    ranges = even_split(sources)

    def restore_preflight(event: dict[str, Any], clock: float) -> dict[str, Any]:
        return {
            "ReplicationGroupId": CACHE,
            "SnapshotName": SNAPSHOT,
            "SourceClusterMode": True,
            "ClusterMode": True,
            "NumNodeGroups": sources,
            "ReplicasPerNodeGroup": 1,
            "CacheNodeType": "cache.r7g.16xlarge",
            "TargetType": "ecs",
            "Engine": "valkey",
            "SourcesKey": storage.restore_sources_key(CACHE, event["ExecutionName"]),
            "SourceCount": sources,
            "ExecutionName": event["ExecutionName"],
        }

    def provision(event: dict[str, Any], clock: float) -> dict[str, Any]:
        targets = [
            {"Host": _host(i), "Port": 6379, "Slots": format_slot_ranges([ranges[i - 1]])}
            for i in range(1, sources + 1)
        ]
        return {
            **event,
            "Targets": targets,
            # restore_workflow.load_task: half the sources too big for a Lambda load in worker tasks
            "LoadTasks": [{"Index": i, "Runner": "ecs" if i % 2 else "inline"} for i in range(1, sources + 1)],
            "Seeded": False,  # several sources: loaded through RESTORE (restore.seeded.seedable)
        }

    def load_shard(event: dict[str, Any], clock: float) -> dict[str, Any]:
        index = event["Task"]["Index"]
        return {
            "Index": index,
            "KeysLoaded": 123456789,
            "ResultKey": storage.restore_work_key(event["ReplicationGroupId"], event["ExecutionName"], index),
        }

    load_events: list[str] = []

    def run_load_task(event: dict[str, Any], clock: float) -> dict[str, Any]:
        (container,) = event["Overrides"]["ContainerOverrides"]
        assert container["Command"] == ["python", "-m", "cachevault.worker", "load"]
        load_events.append(container["Environment"][0]["Value"])
        arn = f"arn:aws:ecs:eu-west-1:123456789012:task/cachevault/{'f' * 32}"
        return {"TaskArn": arn, "LastStatus": "STOPPED", "Containers": [{"Name": "worker", "ExitCode": 0}]}

    def attach(event: dict[str, Any], clock: float) -> dict[str, Any]:
        return event  # before the load: passes its input on

    # What each load wrote to its execution document, at its worst: every target reached,
    # 40 samples of 2 KB, modules skipped.
    details = [
        {
            "Index": i,
            "KeysPerTarget": [123456] * sources,
            "KeysWithTtlPerTarget": [1234] * sources,
            "KeysExpiredSkipped": 12,
            "BytesSent": 1 << 40,
            "Seconds": 3600.5,
            "FunctionLibraries": 3,
            "ModuleKeysSkipped": [{"Module": "ReJSON-RL", "Key": "k" * 200, "Offset": 1 << 39}] * 50,
        }
        for i in range(1, sources + 1)
    ]

    def verify(event: dict[str, Any], clock: float) -> dict[str, Any]:
        # ECS overrides hold 8 KB: a worker's LOAD_EVENT must not grow with the shard count.
        assert load_events and max(len(e) for e in load_events) < 2048
        report = {
            "Compared": "keys per primary (INFO keyspace) and DUMP of sampled keys vs restored payload; every "
            "replica linked and in sync (replication offset equal to its primary's)",
            "KeyCounts": [
                {"Target": f"{t['Host']}:{t['Port']}", "Expected": 123456789, "Actual": 123456789}
                for t in event["Targets"]
            ],
            "SampledKeys": 40 * sources,
            "SampledExpired": 0,
            "Mismatches": [],
            "KeysExpected": 123456789 * sources,
            "ReplicasInSync": sources,
        }
        return {k: v for k, v in event.items() if k != "LoadResults"} | {
            "Verification": report,
            "LoadSummary": restore_workflow._load_summary(details),
        }

    def complete(event: dict[str, Any], clock: float) -> dict[str, Any]:
        keep = ("ClusterMode", "NumNodeGroups", "Verification", "LoadSummary", "SnapshotName")
        return {"ReplicationGroupId": event["ReplicationGroupId"], "Status": "available"} | {k: event[k] for k in keep}

    return {
        "RestorePreflightFunction": restore_preflight,
        "RestoreProvisionFunction": provision,
        "RestoreLoadShardFunction": load_shard,
        "runTask.sync": run_load_task,
        "RestoreLoadResultFunction": load_shard,  # the same output, read back from S3
        "RestoreAttachReplicasFunction": attach,
        "RestoreVerifyFunction": verify,
        "RestoreCompleteFunction": complete,
    }


@pytest.mark.parametrize("sources", [3, 100, 500])
def test_restore_payloads_stay_under_256_kb(sources: int) -> None:
    walk = Walk(restore_steps(sources), execution_name="restore-" + CACHE + "-4415edd5")
    output = walk.run(
        DEFINITIONS["RestoreSnapshotStateMachine"],
        {"SnapshotName": SNAPSHOT, "ReplicationGroupId": CACHE, "NumNodeGroups": sources},
    )
    assert output["Status"] == "available"
    assert walk.largest < PAYLOAD_LIMIT, (walk.largest, walk.largest_at)
    assert len(output["LoadSummary"]["ModuleKeysSkipped"]) == restore_workflow.MODULE_KEYS_LISTED
    assert output["LoadSummary"]["ModuleKeysSkippedCount"] == 50 * sources
    assert walk.events < HISTORY_LIMIT
