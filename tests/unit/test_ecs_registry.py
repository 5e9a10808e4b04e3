"""The embedded ECS's task registry: atomic private records, and which process a record names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cachevault_tools.local.ecs_registry import (
    NODE,
    SUSPENDED,
    ContainerRecord,
    TaskRecord,
    TaskRegistry,
    same_process,
    start_time,
)

ARN = "arn:aws:ecs:us-east-1:123456789012:task/cachevault-tasks/0f1e2d3c"


def _record(**changes: object) -> TaskRecord:
    record = TaskRecord(
        arn=ARN, cluster_arn="arn:aws:ecs:us-east-1:123456789012:cluster/cachevault-tasks",
        task_definition_arn="arn:aws:ecs:us-east-1:123456789012:task-definition/node:1", kind=NODE,
        address="127.20.0.5", workdir="/x", tags=[{"key": "cachevault:cache", "value": "c"}],
        containers=[ContainerRecord("node", ["/usr/bin/redis-server", "--requirepass", "pw"], {"A": "1"}, 42, 7)],
    )  # fmt: skip
    for name, value in changes.items():
        setattr(record, name, value)
    return record


def test_records_round_trip_private_and_replace_atomically(tmp_path: Path) -> None:
    registry = TaskRegistry(tmp_path / "ecs")
    workdir, logs = registry.make_dirs("0f1e2d3c")
    registry.save(_record())
    registry.save(_record(state=SUSPENDED, runtime_args={"node": ["--replicaof", "127.1.1.1", "6379"]}))
    (loaded,) = registry.load_all()
    assert loaded == _record(state=SUSPENDED, runtime_args={"node": ["--replicaof", "127.1.1.1", "6379"]})
    path = tmp_path / "ecs" / "registry" / "0f1e2d3c.json"
    assert path.stat().st_mode & 0o777 == 0o600  # a command may hold a password
    assert workdir.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["0f1e2d3c.json"]  # no temp file left

    (logs / "node.log").write_text("kept")
    registry.drop("0f1e2d3c")
    assert registry.load_all() == [] and not workdir.exists()
    assert (logs / "node.log").read_text() == "kept"  # the log stream outlives the task


def test_an_unreadable_record_is_skipped(tmp_path: Path) -> None:
    registry = TaskRegistry(tmp_path / "ecs")
    registry.save(_record())
    (registry.records_dir / "broken.json").write_text("{")
    assert [r.arn for r in registry.load_all()] == [ARN]


def test_same_process_needs_the_same_start_time_and_program() -> None:
    code = "import sys, time; print('ready', flush=True); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"  # past its exec
        started = start_time(proc.pid)
        assert started is not None
        assert same_process(proc.pid, started, [sys.executable, "-c", "..."])
        assert not same_process(proc.pid, started + 1, [sys.executable])  # a reused PID starts later
        assert not same_process(proc.pid, started, ["/usr/bin/redis-server"])  # another program
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert start_time(proc.pid) is None and not same_process(proc.pid, started, [sys.executable])
    assert not same_process(None, started, [sys.executable]) and start_time(os.getpid()) is not None
