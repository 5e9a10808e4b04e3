"""The CLI as a user runs it: separate processes against ``cachevault local up`` (server mode).

One module-scoped local service on a free loopback port with its own state dir; every
command is a fresh ``python -m cachevault.cli`` process, so nothing is shared in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cachevault.local.redis_process import free_port, process_alive

TIMEOUT_S = 180


def run_cli(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["CACHEVAULT_HOME"] = str(home)
    proc = subprocess.run(
        [sys.executable, "-m", "cachevault.cli", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cachevault {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_json(home: Path, *args: str) -> Any:
    return json.loads(run_cli(home, *args, "--json").stdout)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("cli-home")
    up = run_json(home, "local", "up", "--port", str(free_port()))
    assert up["Endpoint"].startswith("http://127.0.0.1:")
    try:
        yield home
    finally:
        down = run_json(home, "local", "down")
        assert any("embedded AWS" in s for s in down["Stopped"])
        assert not process_alive(up["Pid"])


def test_status_reports_running_service(home: Path) -> None:
    status = run_json(home, "local", "status")
    assert status["Running"] is True
    assert status["StateDir"] == str(home)


def test_cache_snapshot_restore_round_trip_through_separate_processes(home: Path) -> None:
    created = run_json(home, "cache", "create", "cli-src", "--replicas", "1")["ReplicationGroup"]
    assert created["Status"] == "available"
    primary = created["NodeGroups"][0]["PrimaryEndpoint"]
    conn = redis.Redis(host=primary["Address"], port=primary["Port"])
    conn.mset({f"cli:{i}": f"value-{i}" for i in range(500)})
    conn.close()

    snap = run_json(home, "snapshot", "create", "cli-src", "CLI-Snap", "--wait")["Snapshot"]
    assert snap["SnapshotName"] == "cli-snap"  # stored lowercase, as ElastiCache does
    assert snap["SnapshotStatus"] == "available"
    assert snap["CacheVault"]["SizeBytes"] > 0
    assert snap["NodeSnapshots"][0]["CacheVault"]["SourceRole"] == "replica"

    listing = run_json(home, "snapshot", "list", "--replication-group-id", "cli-src")
    assert [s["SnapshotName"] for s in listing["Snapshots"]] == ["cli-snap"]

    restored = run_cli(
        home, "restore", "cli-snap", "cli-dst", "--shards", "2", "--cluster-mode", "enabled", "--wait", "--json"
    )
    group = json.loads(restored.stdout)["ReplicationGroup"]
    assert group["Status"] == "available"
    assert sum(c["Actual"] for c in group["CacheVault"]["Restore"]["Verification"]["KeyCounts"]) == 500
    # Not a terminal: plain progress lines on stderr, from what the load step recorded.
    assert "load shard 0001: done 100% 500 of 500 keys" in restored.stderr

    described = run_json(home, "cache", "describe", "--replication-group-id", "cli-dst")["ReplicationGroups"][0]
    assert len(described["NodeGroups"]) == 2
    assert described["ClusterMode"] == "enabled"
    assert all(g["PrimaryEndpoint"]["Port"] > 0 for g in described["NodeGroups"])

    human = run_cli(home, "cache", "list").stdout
    assert "cli-src" in human and "cli-dst" in human

    run_json(home, "cache", "delete", "cli-dst")
    run_json(home, "snapshot", "delete", "cli-snap")
    assert run_json(home, "snapshot", "list")["Snapshots"] == []


def test_snapshot_json_reads_with_the_aws_cli_jq_paths(home: Path) -> None:
    created = run_json(home, "cache", "create", "--replication-group-id", "cli-jq", "--replicas", "1")
    primary = created["ReplicationGroup"]["NodeGroups"][0]["PrimaryEndpoint"]
    conn = redis.Redis(host=primary["Address"], port=primary["Port"])
    conn.mset({f"jq:{i}": "x" * 100 for i in range(200)})
    conn.close()
    made = run_cli(
        home, "snapshot", "create", "--replication-group-id", "cli-jq", "--snapshot-name", "jq-snap", "--wait"
    )
    assert "capture shard 0001: done 100%" in made.stderr
    assert "0 B captured" not in made.stdout + made.stderr
    assert "MiB" in made.stdout or "KiB" in made.stdout

    described = run_json(home, "snapshot", "describe", "jq-snap")
    snapshot = described["Snapshots"][0]
    assert snapshot["SnapshotStatus"] == "available"
    assert snapshot["ARN"].startswith("arn:aws:elasticache:") and snapshot["ARN"].endswith(":snapshot:jq-snap")
    assert snapshot["ClusterMode"] == "disabled"
    assert snapshot["NodeSnapshots"][0]["NodeGroupConfiguration"]["NodeGroupId"] == "0001"
    assert {"SnapshotRetentionLimit", "NumNodeGroups"} <= snapshot.keys()
    if shutil.which("jq"):
        out = subprocess.run(
            ["jq", "-r", ".Snapshots[0].SnapshotStatus"],
            input=run_cli(home, "snapshot", "describe", "jq-snap", "--json").stdout,
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == "available"

    copied = run_cli(home, "snapshot", "copy", "jq-snap", "jq-copy", "--wait", "--json")
    assert json.loads(copied.stdout)["Snapshot"]["SnapshotName"] == "jq-copy"
    assert "copy shard 0001: done 100%" in copied.stderr

    run_json(home, "snapshot", "delete", "--snapshot-name", "jq-copy")
    run_json(home, "snapshot", "delete", "jq-snap")
    run_json(home, "cache", "delete", "cli-jq")


def test_errors_print_like_the_aws_cli(home: Path) -> None:
    proc = run_cli(home, "snapshot", "create", "no-such-cache", "snap-x", check=False)
    assert proc.returncode == 254
    assert "An error occurred (ReplicationGroupNotFoundFault) when calling the CreateSnapshot operation" in proc.stderr

    proc = run_cli(home, "snapshot", "create", "no-such-cache", "Bad--Name", check=False)
    assert proc.returncode == 254
    assert "(InvalidParameterValueException)" in proc.stderr


def test_commands_without_a_running_service_say_how_to_start_it(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "snapshot", "list", check=False)
    assert proc.returncode == 254
    assert "cachevault local up" in proc.stderr
