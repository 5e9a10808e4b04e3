"""Every state of a 500-shard restore stays under Step Functions' 256 KB payload limit.

The states are built by the restore's own functions from realistic values (500 shards
restored into 500, each source spread over every target and skipping module values,
the longest names the checks allow), and passed through the ASL's own Parameters and
ResultPath the way the interpreter does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cachevault.catalog import storage
from cachevault.nodes.slots import even_split, format_slot_ranges
from cachevault.rdb.reader import RdbModuleSkipped
from cachevault.restore import steps as rw
from cachevault.restore.load import LoadResult, LoadStats
from cachevault.restore.verify import (
    SAMPLE_LIMIT,
    SAMPLE_MAX_PAYLOAD,
    SAMPLES_PER_SOURCE,
    sample_record,
    samples_per_source,
)

SHARDS = 500
LIMIT = 256 * 1024
ASL = json.loads((Path(__file__).resolve().parents[2] / "statemachines" / "restore_snapshot.asl.json").read_text())
BUCKET = "cachevault-snapshots-123456789012-ap-southeast-2"
TARGET = "t" * 40
SNAPSHOT = "automatic." + "c" * 40 + "-2026-11-26-05-10"
EXECUTION = f"restore-{TARGET}-0123abcd"


def _size(state: Any) -> int:
    return len(json.dumps(state, separators=(",", ":")).encode())


def _manifest_node(i: int, slots: str) -> dict[str, Any]:
    return {
        "NodeGroupId": f"{i:04d}",
        "Slots": slots,
        "CacheNodeId": f"{'c' * 40}-{i:04d}-002",
        "S3Key": f"snapshots/{SNAPSHOT}/{SNAPSHOT}-{i:04d}.rdb",
        "CacheSize": 987_654_321_000,
        "Sha256": hashlib.sha256(str(i).encode()).hexdigest(),
        "RdbVersion": 12,
        "KeyCount": 123_456_789,
        "KeysPerDb": {"0": 123_456_789},
        "ExpiresPerDb": {"0": 23_456_789},
        "KeyCountExact": True,
        "Functions": 12,
        "ModuleKeysSkipped": 0,
    }


def _path(state: dict[str, Any], path: str) -> Any:
    value: Any = state
    for part in path.removeprefix("$.").split("."):
        value = value[part]
    return value


def test_load_tasks_too_big_for_a_lambda_go_to_a_worker(monkeypatch) -> None:
    source = rw._manifest_source(BUCKET, _manifest_node(1, "0-16383")) | {"Index": 1}
    assert rw.load_task(source)["Runner"] == "ecs"  # 987 GB
    assert rw.load_task(source | {"Size": 5 << 30})["Runner"] == "inline"
    monkeypatch.setenv(rw.LOAD_INLINE_MAX_BYTES_ENV, str(1 << 30))
    assert rw.load_task(source | {"Size": 5 << 30})["Runner"] == "ecs"
    assert set(rw.load_task(source)) == {"Index", "Bucket", "Key", "Sha256", "Size", "KeyCount", "Runner"}


def test_every_state_of_a_500_shard_restore_is_below_256_kb() -> None:
    ranges = [format_slot_ranges([r]) for r in even_split(SHARDS)]
    request = {
        "SnapshotName": SNAPSHOT,
        "ReplicationGroupId": TARGET,
        "NumNodeGroups": SHARDS,
        "ReplicasPerNodeGroup": 5,
        "ClusterMode": "enabled",
    }
    sources = [
        rw._manifest_source(BUCKET, _manifest_node(i, ranges[i - 1])) | {"Index": i} for i in range(1, SHARDS + 1)
    ]
    preflight = {
        "ReplicationGroupId": TARGET,
        "SnapshotName": SNAPSHOT,
        "SourceClusterMode": True,
        "ClusterMode": True,
        "NumNodeGroups": SHARDS,
        "ReplicasPerNodeGroup": 5,
        "CacheNodeType": "cache.r7g.16xlarge",
        "TargetType": "ecs",
        "Engine": "valkey",
        "SourcesKey": storage.restore_sources_key(TARGET, EXECUTION),  # the sources are in S3
        "SourceCount": len(sources),
        "ExecutionName": EXECUTION,
    }
    targets = [{"Host": f"10.123.{i}.{200 + i % 50}", "Port": 6379, "Slots": ranges[i]} for i in range(SHARDS)]
    provision = preflight | {
        "Targets": targets,
        "LoadTasks": [{k: rw.load_task(s)[k] for k in ("Index", "Runner")} for s in sources],  # as provision_step
        "Seeded": False,
    }
    sizes = {"Preflight input": _size(request), "Preflight": _size(preflight), "ProvisionCache": _size(provision)}
    sizes["AttachReplicas"] = _size(provision)  # passes its input on

    # One Map item's input, built from the ASL's own Parameters.
    params = ASL["States"]["LoadShards"]["Parameters"]
    item = {
        key.removesuffix(".$"): (
            provision["LoadTasks"][-1]
            if value == "$$.Map.Item.Value"
            else EXECUTION
            if value.startswith("$$.Execution")
            else _path(provision, value)
        )
        for key, value in params.items()
    }
    assert set(item["Task"]) == {"Index", "Runner"} and item["SourcesKey"] == preflight["SourcesKey"]
    sizes["LoadShard input"] = _size(item)

    loads, all_details = [], []
    for task in provision["LoadTasks"]:
        result = LoadResult(
            [LoadStats(f"{t['Host']}:6379", 1_234_567, 234_567, 9_876_543_210, 9876, 123.456) for t in targets],
            keys_expired_skipped=12_345,
            seconds=812.345,
            modules_skipped=[RdbModuleSkipped(0, b"k" * 200, "ReJSON-RL", 10**12 + n) for n in range(1000)],
            function_libraries_loaded=12 * SHARDS,
        )
        samples = [sample_record(0, b"k" * 100, b"v" * SAMPLE_MAX_PAYLOAD, 1_795_653_761_165)] * SAMPLES_PER_SOURCE
        details, output = rw.load_outputs(task, result, samples)
        assert "Samples" not in output and "KeysPerTarget" not in output and "ModuleKeysSkipped" not in output
        assert len(details["ModuleKeysSkipped"]) == 1000 and len(details["KeysPerTarget"]) == SHARDS
        loads.append(output | {"ResultKey": storage.restore_work_key(TARGET, EXECUTION, task["Index"])})
        assert len(json.dumps(details | {"Output": loads[-1]})) < 1 << 20  # the S3 result object stays small
        all_details.append(details)
    sizes["LoadShard output"] = max(_size(r) for r in loads)
    after_map = provision | {ASL["States"]["LoadShards"]["ResultPath"].removeprefix("$."): loads}
    sizes["after LoadShards"] = _size(after_map)

    report = {
        "Compared": "x" * 200,
        "KeyCounts": [{"Target": f"{t['Host']}:6379", "Expected": 123_456_789, "Actual": 123_456_789} for t in targets],
        "SampledKeys": 1000,
        "SampledExpired": 0,
        "Mismatches": [],
        "KeysExpected": 123_456_789 * SHARDS,
        "ReplicasInSync": 5 * SHARDS,
    }
    verified = {k: v for k, v in after_map.items() if k != "LoadResults"} | {
        "Verification": report,
        "LoadSummary": rw._load_summary(all_details),
    }
    sizes["Verify"] = _size(verified)
    failed = {"State": after_map | {"Error": {"Error": "RestoreFailed", "Cause": "c" * 4096}}}
    sizes["MarkFailed input"] = _size(failed)

    print(json.dumps(sizes, indent=1))
    too_big = {name: size for name, size in sizes.items() if size >= LIMIT}
    assert not too_big, too_big
    # Headroom: the largest state uses well under the limit.
    assert max(sizes.values()) < LIMIT * 0.75, sizes


def test_every_source_keeps_its_share_of_what_verify_compares() -> None:
    """Verify compares SAMPLE_LIMIT samples in all: with many sources each keeps fewer, never none."""
    assert [samples_per_source(n) for n in (1, 25, 26, 500, 2000)] == [40, 40, 38, 2, 1]
    assert all(n * samples_per_source(n) <= SAMPLE_LIMIT for n in range(1, 1001))
