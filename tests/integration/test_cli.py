"""The CLI as a user runs it: separate processes against ``cachevault local up`` (server mode).

One module-scoped local service on a free loopback port with its own state dir; every
command is a fresh ``python -m cachevault_tools.cli`` process, so nothing is shared in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cachevault_tools.local.redis_process import free_port, process_alive

from tests.local_service import run_cli, run_json
from tests.product_fixtures import wait_until


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
    # Not a terminal: plain progress lines on stderr, from what the load step recorded: one
    # LoadShard cut the RDB (bytes read) and streamed each node's part to its seed (bytes relayed).
    assert "load shard 0001: done 100%" in restored.stderr
    assert "seed of cli-dst-0001-001: done" in restored.stderr and "seed of cli-dst-0002-001: done" in restored.stderr

    described = run_json(home, "cache", "describe", "--replication-group-id", "cli-dst")["ReplicationGroups"][0]
    assert len(described["NodeGroups"]) == 2
    assert described["ClusterMode"] == "enabled"
    assert all(g["PrimaryEndpoint"]["Port"] > 0 for g in described["NodeGroups"])

    human = run_cli(home, "cache", "list").stdout
    assert "cli-src" in human and "cli-dst" in human

    run_json(home, "cache", "delete", "cli-dst")
    run_json(home, "snapshot", "delete", "cli-snap")
    assert run_json(home, "snapshot", "list")["Snapshots"] == []
    # cli-dst's nodes were started by the embedded AWS (the restore) and killed by this
    # CLI process (the delete): the embedded AWS reaps them, no zombie stays behind.
    server = json.loads((home / "local" / "stack.json").read_text())["pid"]
    wait_until(lambda: not zombie_children(server), 15, "the embedded AWS to reap the deleted cache's nodes")


def zombie_children(parent: int) -> list[int]:
    zombies = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == parent:
            zombies.append(int(entry.name))
    return zombies


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


def _state(home: Path) -> tuple[Any, Any]:
    caches = run_json(home, "cache", "list")
    snapshots = run_json(home, "snapshot", "list")
    return caches, snapshots


BAD_INPUTS = [
    pytest.param(("cache", "create", "bad-shards", "--cluster-mode", "enabled", "--shards", "0"),
                 "CreateReplicationGroup", "InvalidParameterValueException", "NumNodeGroups must be between 1 and 500",
                 id="cache-zero-shards"),
    pytest.param(("cache", "create", "bad-replicas", "--replicas", "6"),
                 "CreateReplicationGroup", "InvalidParameterValueException", "ReplicasPerNodeGroup must be between 0",
                 id="cache-six-replicas"),
    pytest.param(("cache", "create", "bad-type", "--cache-node-type", "bogus"),
                 "CreateReplicationGroup", "InvalidParameterValueException", "Invalid CacheNodeType 'bogus'",
                 id="cache-bogus-node-type"),
    pytest.param(("cache", "create", "bad-type", "--cache-node-type", ""),
                 "CreateReplicationGroup", "InvalidParameterValueException", "Invalid CacheNodeType ''",
                 id="cache-empty-node-type"),
    pytest.param(("cache", "create", "\u212aelvin"),
                 "CreateReplicationGroup", "InvalidParameterValueException", "non-ASCII character",
                 id="cache-kelvin-sign"),
    pytest.param(("snapshot", "create", "cli-src", "\u212a-snap"),
                 "CreateSnapshot", "InvalidParameterValueException", "non-ASCII character", id="snapshot-kelvin-sign"),
    pytest.param(("restore", "some-snap", "new-cache", "--shards", "0"),
                 "CreateReplicationGroup", "InvalidParameterValueException", "NumNodeGroups must be between 1 and 500",
                 id="restore-zero-shards"),
    pytest.param(("restore", "some-snap", "new-cache", "--replicas", "-1"),
                 "CreateReplicationGroup", "InvalidParameterValueException", "ReplicasPerNodeGroup must be between 0",
                 id="restore-negative-replicas"),
    pytest.param(("restore", "some-snap", "new-cache", "--node-type", "cache.r7g.huge"),
                 "CreateReplicationGroup", "InvalidParameterValueException", "family cache.r7g comes in sizes",
                 id="restore-unknown-size"),
    pytest.param(("restore", "--from-s3", "s3://some-bucket/x.rdb?versionId=1&acl=public", "new-cache"),
                 "CreateReplicationGroup", "InvalidARN", "the only query an S3 source may carry",
                 id="restore-s3-query"),
    pytest.param(("snapshot", "copy", "some-snap", "evil-copy", "--target-bucket", "../evil"),
                 "CopySnapshot", "InvalidParameterValueException", "is not a valid S3 bucket name",
                 id="export-bucket-path"),
]


@pytest.mark.parametrize(("argv", "operation", "code", "message"), BAD_INPUTS)
def test_bad_inputs_are_refused_and_change_nothing(
    home: Path, argv: tuple[str, ...], operation: str, code: str, message: str
) -> None:
    before = _state(home)
    proc = run_cli(home, *argv, check=False)
    assert proc.returncode == 254, proc.stderr
    assert f"An error occurred ({code}) when calling the {operation} operation: " in proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _state(home) == before


def test_an_unreachable_endpoint_is_an_error_line_not_a_traceback(home: Path, tmp_path: Path) -> None:
    # The stack file of a running service whose endpoint no longer answers (the embedded AWS gone).
    stack = json.loads((home / "local" / "stack.json").read_text())
    stack["endpoint_url"] = f"http://127.0.0.1:{free_port()}"
    stack["pid"] = os.getpid()
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "stack.json").write_text(json.dumps(stack))
    proc = run_cli(tmp_path, "snapshot", "list", check=False)
    assert proc.returncode == 254, proc.stderr
    assert "An error occurred (EndpointConnectionError) when calling the DescribeSnapshots operation" in proc.stderr
    assert "cachevault local up" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_giving_up_a_wait_says_the_operation_continues(home: Path) -> None:
    created = run_json(home, "cache", "create", "cli-wait", "--replicas", "1")["ReplicationGroup"]
    try:
        argv = ("snapshot", "create", "cli-wait", "wait-snap", "--wait", "--wait-timeout", "0")
        proc = run_cli(home, *argv, check=False)
        assert proc.returncode == 255, proc.stderr
        assert "Stopped waiting: CreateSnapshot is still running and continues" in proc.stderr
        assert "Follow it with: cachevault snapshot describe wait-snap" in proc.stderr
        assert "Traceback" not in proc.stderr
        # It did continue: the snapshot becomes available, and --wait on it now ends with it.
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:
            found = run_cli(home, "snapshot", "describe", "wait-snap", "--json", check=False)
            if found.returncode == 0:
                status = json.loads(found.stdout)["Snapshots"][0]["SnapshotStatus"]
                if status != "creating":
                    break
        assert status == "available"
    finally:
        run_cli(home, "snapshot", "delete", "wait-snap", check=False)
        run_json(home, "cache", "delete", created["ReplicationGroupId"])


def test_a_snapshot_from_the_primary_shows_its_warning(home: Path) -> None:
    created = run_json(home, "cache", "create", "cli-solo", "--replicas", "0")["ReplicationGroup"]
    try:
        proc = run_cli(home, "snapshot", "create", "cli-solo", "solo-snap", "--wait")
        assert "warning: Shard 0001: no healthy replica (the shard has no replica)" in proc.stderr
        assert "cli-solo-0001-001 (primary)" in proc.stdout
        assert "  warning: Shard 0001: no healthy replica" in proc.stdout  # the summary keeps it
        described = run_json(home, "snapshot", "describe", "solo-snap")["Snapshots"][0]
        assert described["SnapshotStatus"] == "available"
        warnings = described["CacheVault"]["Warnings"]
        assert len(warnings) == 1 and "taken from the primary" in warnings[0]
    finally:
        run_cli(home, "snapshot", "delete", "solo-snap", check=False)
        run_json(home, "cache", "delete", created["ReplicationGroupId"])
