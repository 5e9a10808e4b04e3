"""A SIGKILL of `cachevault local up` in the middle of a snapshot, a restore and a copy (issue 12).

The real service process (one state dir, one port, started again after every kill) with
captures and loads in ECS worker tasks (``InlineCaptureMaxSeconds=0 LoadInlineMaxBytes=0``
through ``CACHEVAULT_PARAMETER_OVERRIDES``), driven by CLI processes as a user drives it.
Each case waits until its operation is in flight, SIGKILLs the service, runs `local up`
again and checks what that start (its crash recovery, ops/recovery.py) left: the operation
``failed`` with a reason a person reads, the source snapshot ``available`` and restorable
to the same DEBUG DIGEST, the cache unlocked and snapshottable, and nothing behind: no
multipart upload, no staging under ``restores/``, no object or progress of the failed
operation, no ECS task or process of its workers or of the failed target (by the PIDs the
embedded ECS's task registry recorded before the kill), nothing ``available`` unverified.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from cachevault.catalog import storage
from cachevault.catalog.records import Catalog
from cachevault.core.aws import client
from cachevault.core.settings import Settings
from cachevault.nodes import restore_targets
from cachevault.ops.recovery import load_task_group
from cachevault.snapshot import capture_runner
from cachevault_tools.local.ecs_registry import WORKER, TaskRegistry, start_time
from cachevault_tools.local.embedded import EnvPatch
from cachevault_tools.local.environment import PARAMETER_OVERRIDES_ENV
from cachevault_tools.local.redis_process import free_port

from tests.local_service import (
    cli_env,
    digest,
    kill_server,
    kill_task_processes,
    point_at,
    run_cli,
    run_json,
    server_pid,
    up,
)
from tests.product_fixtures import connect, fill, slow_down_saves, wait_until

WAIT_S = 90
# Captures and loads in ECS worker tasks: processes of their own that outlive the killed service.
# Restores load through RESTORE from a load worker (RestoreSeedNodes=false): a batch a paused
# node holds keeps the load in flight for the kill.
OVERRIDES = {PARAMETER_OVERRIDES_ENV: "InlineCaptureMaxSeconds=0 LoadInlineMaxBytes=0 RestoreSeedNodes=false"}
SOURCE, BASE = "crash-src", "crash-base"  # a 1-shard cache and its snapshot: restored and copied
# What a person reads on every operation the start after the kill ended.
GONE = "no longer exists (the embedded AWS was restarted, or its history expired)"


@dataclass
class Service:
    home: Path
    port: int
    patch: EnvPatch

    def cli(self, *args: str) -> Any:
        return run_json(self.home, *args)

    def start(self) -> None:
        up(self.home, self.port, env=OVERRIDES)
        point_at(self.home, self.patch)

    def crash(self) -> None:
        """SIGKILL the service, then `local up` on the same state dir (its start recovers)."""
        kill_server(self.home)
        self.start()

    @property
    def catalog(self) -> Catalog:
        return Catalog(Settings.from_env())

    @property
    def bucket(self) -> str:
        return Settings.from_env().bucket

    def keys(self, prefix: str) -> list[str]:
        listing = client("s3").list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for o in listing.get("Contents", []))

    def body_files(self) -> set[str]:
        """The durable S3's body files on disk (cachevault_tools/local/s3_durable.py): object and part bodies."""
        return {p.name for p in (self.home / "s3").glob("obj-*")}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(home=tmp_path_factory.mktemp("crash-home"), port=free_port(), patch=EnvPatch())
    try:
        svc.start()
        yield svc
    finally:
        svc.patch.restore()
        run_cli(svc.home, "local", "down", check=False)
        kill_task_processes(svc.home)  # whatever a failed test left running


@pytest.fixture(scope="module")
def source_digest(service: Service) -> tuple[Any, int]:
    """SOURCE (1 shard, no replica) with mixed keys, and its snapshot BASE (available): SOURCE's DEBUG DIGEST."""
    group = service.cli("cache", "create", SOURCE, "--replicas", "0")["ReplicationGroup"]
    endpoint = group["NodeGroups"][0]["PrimaryEndpoint"]
    fill(f"{endpoint['Address']}:{endpoint['Port']}", keys=2000)
    made = service.cli("snapshot", "create", SOURCE, BASE, "--wait")["Snapshot"]
    assert made["SnapshotStatus"] == "available"
    return digest(connect(f"{endpoint['Address']}:{endpoint['Port']}"))


@pytest.fixture(autouse=True)
def only_the_source_afterwards(service: Service) -> Iterator[None]:
    """A case that failed half way leaves the next one the service up with only SOURCE and BASE."""
    yield
    if server_pid(service.home) is None:
        service.start()  # killed, never started again
    for cache in service.catalog.list_caches():
        if cache["CacheName"] != SOURCE:
            run_cli(service.home, "cache", "delete", cache["CacheName"], check=False)
    for snap in service.catalog.all_snapshots():
        if snap["SnapshotName"] != BASE:
            run_cli(service.home, "snapshot", "delete", snap["SnapshotName"], check=False)


# ---------------------------------------------------------------------------------- checks
def task_processes(home: Path, groups: set[str]) -> list[tuple[int, int]]:
    """(PID, start time) of every container of the registry's tasks in ``groups``."""
    found = []
    for record in TaskRegistry(home / "ecs").load_all():
        if record.group in groups:
            found += [(c.pid, c.start_time) for c in record.containers if c.pid and c.start_time is not None]
    return found


def running_groups() -> dict[str, list[str]]:
    return restore_targets.running_tasks_by_group()


def failure_reason(text: str | None) -> str:
    assert text and text.startswith("Interrupted: execution ") and text.endswith(GONE), text
    return text


def nothing_left(
    service: Service, *, processes: list[tuple[int, int]], groups: set[str], available: set[str], caches: set[str]
) -> None:
    """What every case checks after the start that followed the kill."""
    s3 = client("s3")
    assert s3.list_multipart_uploads(Bucket=service.bucket).get("Uploads", []) == []
    assert service.keys(storage.RESTORES_PREFIX) == []
    # The killed operation's tasks: none in ECS, their processes gone (same PID and start time).
    running = running_groups()
    assert not groups & set(running), running
    assert not [g for g in running if g.partition(":")[0] in ("capture", "load")], running
    assert [r.arn for r in TaskRegistry(service.home / "ecs").load_all() if r.kind == WORKER] == []
    wait_until(
        lambda: all(start_time(pid) != started for pid, started in processes), WAIT_S, "the tasks' processes to end"
    )
    catalog = service.catalog
    assert [c["CacheName"] for c in catalog.list_caches() if c.get("LockedBy")] == []
    assert {s["SnapshotName"] for s in catalog.all_snapshots() if s["SnapshotStatus"] == "available"} == available
    assert {c["CacheName"] for c in catalog.list_caches() if c.get("Status") == "available"} == caches


def restores_to_source(service: Service, source_digest: tuple[Any, int], target: str) -> None:
    """BASE is available and a restore of it holds SOURCE's data (then the new cache goes)."""
    assert service.cli("snapshot", "describe", BASE)["Snapshots"][0]["SnapshotStatus"] == "available"
    restored = service.cli("restore", BASE, target, "--wait")["ReplicationGroup"]
    assert restored["Status"] == "available"
    endpoint = restored["NodeGroups"][0]["PrimaryEndpoint"]
    assert digest(connect(f"{endpoint['Address']}:{endpoint['Port']}")) == source_digest
    service.cli("cache", "delete", target)


# ---------------------------------------------------------------------------------- (a) a capture
def test_killed_in_a_capture_the_snapshot_fails_and_its_cache_snapshots_again(
    service: Service, source_digest: tuple[Any, int]
) -> None:
    cache, name = "crash-busy", "crash-cut"
    group = service.cli("cache", "create", cache, "--replicas", "0")["ReplicationGroup"]
    endpoint = group["NodeGroups"][0]["PrimaryEndpoint"]
    address = f"{endpoint['Address']}:{endpoint['Port']}"
    conn = connect(address)
    try:
        # The RDB holds db 0 first: 18 MiB there fill the first 16 MiB part at once, then db 1's
        # 3000 small keys, 3 ms each in the save (rdb-key-save-delay), keep the capture running
        # for ~9 s with its multipart upload open.
        conn.mset({f"big:{i}": os.urandom(1 << 20) for i in range(18)})
        db1 = redis.Redis(host=endpoint["Address"], port=endpoint["Port"], db=1, socket_timeout=60)
        db1.mset({f"small:{i}": f"v{i}" for i in range(3000)})
        db1.close()
    finally:
        conn.close()
    slow_down_saves([address], 3000)
    files_before = service.body_files()
    service.cli("snapshot", "create", cache, name)
    prefix = storage.snapshot_prefix(name)

    def streaming() -> bool:
        parts = service.catalog.capture_progress(name).values()
        uploads = client("s3").list_multipart_uploads(Bucket=service.bucket, Prefix=prefix).get("Uploads", [])
        return (
            any(p.get("CaptureStatus") == "running" and int(p.get("BytesCaptured") or 0) > 0 for p in parts)
            and bool(uploads)
            and bool(running_groups().get(capture_runner.task_group(name)))
        )

    wait_until(streaming, WAIT_S, "the capture worker streaming into its multipart upload")
    workers = task_processes(service.home, {capture_runner.task_group(name)})
    assert workers
    part_files = service.body_files() - files_before
    assert part_files  # the upload's first part, on disk

    service.crash()

    described = service.cli("snapshot", "describe", name)["Snapshots"][0]
    assert described["SnapshotStatus"] == "failed"
    reason = failure_reason(described["CacheVault"].get("FailureReason"))
    assert described["CacheVault"]["ExecutionName"] in reason
    assert service.keys(prefix) == []
    assert not part_files & service.body_files()
    assert service.catalog.capture_progress(name) == {}
    nothing_left(
        service,
        processes=workers,
        groups={capture_runner.task_group(name)},
        available={BASE},
        caches={SOURCE, cache},
    )

    # The cache is not locked: it snapshots again (its node, adopted by the new start, still slow).
    slow_down_saves([address], 0)
    again = service.cli("snapshot", "create", cache, "crash-again", "--wait")["Snapshot"]
    assert again["SnapshotStatus"] == "available"
    for snap in ("crash-again", name):
        service.cli("snapshot", "delete", snap)
    service.cli("cache", "delete", cache)


# ---------------------------------------------------------------------------------- (b) a resharding restore
def test_killed_in_a_resharding_load_the_target_fails_and_the_snapshot_restores(
    service: Service, source_digest: tuple[Any, int]
) -> None:
    target = "crash-dst"
    service.cli("restore", BASE, target, "--shards", "3", "--cluster-mode", "enabled", "--replicas", "0")
    record = wait_until(
        lambda: (c := service.catalog.find_cache(target)) and len(c.get("Nodes") or []) == 3 and c,
        WAIT_S,
        "the new cache's three primaries",
    )
    execution = str(record["RestoreExecution"])
    holds = [connect(node["Address"]) for node in record["Nodes"]]
    try:
        for hold in holds:  # the load worker blocks on its first RESTORE batch: the load stays in flight
            hold.execute_command("CLIENT", "PAUSE", WAIT_S * 1000, "WRITE")

        def loading() -> bool:
            parts = service.catalog.operation_progress("restore", target).values()
            running = any(p.get("Phase") == "load" and p.get("Status") == "running" for p in parts)
            return running and bool(running_groups().get(load_task_group(execution)))

        wait_until(loading, WAIT_S, "the load worker loading the new cache")
        assert service.catalog.get_snapshot(BASE)["SnapshotStatus"] == "restoring"
        groups = {restore_targets.node_task_group(target), load_task_group(execution)}
        processes = task_processes(service.home, groups)
        assert len(processes) == 4  # three nodes, one load worker

        service.crash()
    finally:
        for hold in holds:
            hold.close()

    described = service.cli("cache", "describe", target)["ReplicationGroups"][0]
    assert described["Status"] == "failed"
    assert execution in failure_reason(described["CacheVault"].get("FailureReason"))
    record = service.catalog.get_cache(target)
    assert record["Nodes"] == [] and record["Endpoints"] == []  # never available, no unverified node
    assert service.catalog.operation_progress("restore", target) == {}
    nothing_left(service, processes=processes, groups=groups, available={BASE}, caches={SOURCE})

    restores_to_source(service, source_digest, "crash-back")
    service.cli("cache", "delete", target)  # a failed target is deletable


# ---------------------------------------------------------------------------------- (c) a copy
def test_killed_in_a_copy_the_target_fails_and_the_source_is_handed_back(
    service: Service, source_digest: tuple[Any, int]
) -> None:
    target = "crash-copy"
    # Started in the background: the copy runs on while the CLI waits for its preflight.
    output = service.home / "copy-cli.out"
    with output.open("wb") as sink:  # the CLI's own answer: what a refusal said
        copying = subprocess.Popen(
            [sys.executable, "-m", "cachevault_tools.cli", "snapshot", "copy", BASE, target, "--json"],
            env=cli_env(service.home),
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:

        def accepted_or_refused() -> str | None:
            copy = service.catalog.find_snapshot(target)
            if copy is not None:
                return str(copy["SnapshotStatus"])
            if copying.poll() not in (None, 0):  # refused: nothing will be accepted, say why now
                return f"refused: {output.read_text(errors='replace')}"
            return None

        # The copy and complete steps start cold (a new service): about 1.5 s of `creating`.
        status = wait_until(accepted_or_refused, WAIT_S, "the copy to be accepted", interval=0.01)
        assert status == "creating", f"the copy was not caught while running: {status}"
        service.crash()
    finally:
        try:
            copying.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            copying.kill()  # ours: never left behind
            copying.wait()
            raise

    described = service.cli("snapshot", "describe", target)["Snapshots"][0]
    assert described["SnapshotStatus"] == "failed"
    failure_reason(described["CacheVault"].get("FailureReason"))
    assert service.keys(storage.snapshot_prefix(target)) == []
    assert service.catalog.operation_progress("copy", target) == {}
    base = service.catalog.get_snapshot(BASE)
    assert not {"CopyExecution", "CopyTarget", "CopyTargetBucket"} & set(base)
    nothing_left(service, processes=[], groups=set(), available={BASE}, caches={SOURCE})

    restores_to_source(service, source_digest, "crash-copy-back")
    service.cli("snapshot", "delete", target)
