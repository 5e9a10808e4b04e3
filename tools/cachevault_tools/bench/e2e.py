"""End-to-end benchmark: the CLI commands a user runs, against anchors measured in the same run.

One run per (dataset shape, size): a `cachevault local up`-style server (the embedded AWS,
its own process, on a free port, state under the run's directory), a local cache of one
primary and one replica filled with seeded data, then, each timed from the outside as a
user waits for it:

* ``cachevault snapshot create --wait`` vs ``redis-cli --rdb`` from the same replica;
* ``cachevault restore --wait --replicas 0`` (same layout, one node) vs redis-server loading
  that RDB at start-up, and ``cachevault restore --wait`` (the snapshot's layout: a primary and
  its replica) vs two servers loading it at start-up in parallel;
* ``cachevault restore --wait --shards 3`` vs the same data loaded at start-up into the
  3-shard layout (the restored primaries' own RDBs, started in parallel).

Each operation also reports where its time went (per state, from the Step Functions
execution history: first entry to last exit, so Map iterations overlap), and the peak RSS
and CPU seconds of every process involved (CLI, embedded AWS, its Lambda workers and ECS
tasks, redis nodes and their save forks), sampled from /proc while it runs: on 2 cores the
CPU column shows which process the others wait for. Correctness: DEBUG DIGEST of source
and targets.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import redis
from cachevault.core import stack as stack_info
from cachevault.restore.verify import cache_digest, combined_digest

from cachevault_tools import datagen
from cachevault_tools.bench.restore import _time_startup
from cachevault_tools.local.embedded import EnvPatch
from cachevault_tools.local.redis_process import RedisProcess, free_port

MiB = 1 << 20
SHAPES = ("small-keys", "large-values")
RESHARD_TO = 3
GOALS = {"capture": 1.2, "restore": 1.5, "reshard": 2.5}  # issue 11, at 1 GB on 2 cores


# ------------------------------------------------------------------------------ processes


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far (proc(5): stat fields 14 and 15), None once gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on: comm may hold spaces
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found += [int(c) for c in text.split()]
    except OSError:
        pass
    return found


def _label(pid: int) -> str:
    """A short name for a process: redis-server, embedded AWS, lambda worker, ECS task, CLI."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode("utf-8", "replace") for a in argv if a]
    text = " ".join(words)
    if text.startswith("redis-rdb") or text.startswith("redis-aof"):
        return "redis-server (save fork)"  # a forked child renames itself
    if "redis-server" in text:
        return "redis-server"
    if "cachevault_tools.local.server" in text:
        return "embedded AWS"
    if "cachevault_tools.cli" in words:
        return "cachevault CLI"
    if "cachevault_tools.local.lambda_zygote" in words:
        # Its forks run lambda_worker under the zygote's command line; they rename themselves.
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "lambda_worker":
                return "lambda_worker"
        return "lambda_zygote"
    if "-m" in words and words.index("-m") + 1 < len(words):
        module = words[words.index("-m") + 1]
        if module == "cachevault.worker" and words[-1] in ("capture", "load", "seed"):
            return f"ECS worker ({words[-1]})"  # a node task's seed container, or a capture/load job
        return module.rsplit(".", 1)[-1]
    return Path(words[0]).name if words else "?"


class PeakSampler:
    """Peak RSS (VmHWM) and CPU seconds per process label, for the roots and all their descendants.

    CPU is each process's own (not its reaped children's), counted from ``__enter__`` (or
    from its start, for a process started later) to its last sample: a process that exits
    loses at most one interval, 0.1 s.
    """

    def __init__(self, roots: list[int], interval_s: float = 0.1) -> None:
        self.roots = roots
        self.interval_s = interval_s
        self.peaks_mb: dict[str, float] = {}
        self._cpu_at_start: dict[int, float] = {}
        self._cpu_last: dict[int, tuple[str, float]] = {}  # pid -> (label, CPU seconds at its last sample)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cpu_s(self) -> dict[str, float]:
        """CPU seconds per process label while sampled (the processes of one label summed)."""
        totals: dict[str, float] = {}
        for pid, (label, seconds) in self._cpu_last.items():
            used = seconds - self._cpu_at_start.get(pid, 0.0)
            totals[label] = totals.get(label, 0.0) + used
        return {label: round(used, 2) for label, used in totals.items()}

    def add_root(self, pid: int) -> None:
        self.roots.append(pid)

    def __enter__(self) -> PeakSampler:
        for pid in self._tree():  # peaks and CPU of long-lived processes from now on
            _reset_peak(pid)
            if (cpu := _cpu_s(pid)) is not None:
                self._cpu_at_start[pid] = cpu
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _tree(self) -> list[int]:
        seen: list[int] = []
        todo = list(self.roots)
        while todo:  # bounded: a process tree is finite and each pid is visited once
            pid = todo.pop()
            if pid in seen:
                continue
            seen.append(pid)
            todo += _children(pid)
        return seen

    def _sample(self) -> None:
        for pid in self._tree():
            label = _label(pid)
            if label == "?":  # it exited while the tree was walked
                continue
            mb = _status_kb(pid, "VmHWM") / 1024
            self.peaks_mb[label] = max(self.peaks_mb.get(label, 0.0), round(mb, 1))
            if (cpu := _cpu_s(pid)) is not None:
                self._cpu_last[pid] = (label, cpu)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()


def _reset_peak(pid: int) -> None:
    with contextlib.suppress(OSError):  # a process that just exited
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (proc(5))


# ------------------------------------------------------------------------------ CLI and history


def _cli(args: list[str], env: dict[str, str], sampler: PeakSampler | None = None) -> tuple[float, Any]:
    """Run ``cachevault ARGS --json``; (seconds, parsed JSON).

    The CLI's peak RSS is the sampler's (its VmHWM): a child's ``ru_maxrss`` starts from the
    parent's RSS at the fork (Linux carries it across exec), so it reported this process's
    size, not the CLI's.
    """
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachevault_tools.cli", *args, "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if sampler is not None:
        sampler.add_root(proc.pid)
    streams: dict[str, bytes] = {}
    readers = [
        threading.Thread(target=lambda n=n, f=f: streams.__setitem__(n, f.read()), daemon=True)
        for n, f in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for r in readers:
        r.start()
    proc.wait()
    seconds = time.monotonic() - started
    for r in readers:
        r.join()
    if proc.returncode != 0:
        tail = streams.get("err", b"").decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"cachevault {' '.join(args)} failed ({proc.returncode}): {tail}")
    return seconds, json.loads(streams["out"])


def state_breakdown(sfn: Any, execution_arn: str) -> dict[str, float]:
    """Seconds per state: first entry to last exit (Map iterations overlap), in entry order."""
    events: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"executionArn": execution_arn, "maxResults": 1000}
    while True:  # bounded: pages end when nextToken is absent
        page = sfn.get_execution_history(**kwargs)
        events += page["events"]
        if not page.get("nextToken"):
            break
        kwargs["nextToken"] = page["nextToken"]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for e in events:
        ts = e["timestamp"].timestamp()
        if e["type"].endswith("StateEntered"):
            name = e["stateEnteredEventDetails"]["name"]
            first.setdefault(name, ts)
        elif e["type"].endswith("StateExited"):
            name = e["stateExitedEventDetails"]["name"]
            last[name] = ts
    return {n: round(last[n] - t, 3) for n, t in first.items() if n in last}


def _execution_arn(machine_arn: str, name: str) -> str:
    return machine_arn.replace(":stateMachine:", ":execution:") + ":" + name


def _newest_execution(sfn: Any, machine_arn: str) -> str:
    execs = sfn.list_executions(stateMachineArn=machine_arn, maxResults=100)["executions"]
    return max(execs, key=lambda e: e["startDate"])["executionArn"]


# ------------------------------------------------------------------------------ the run


@contextmanager
def _local_stack(home: Path) -> Iterator[tuple[stack_info.StackInfo, dict[str, str]]]:
    """`cachevault local up` on a free port with CACHEVAULT_HOME=home; `local down` at the end."""
    from cachevault_tools.cli import context

    patch = EnvPatch()
    patch.set("CACHEVAULT_HOME", str(home))
    try:
        info = context.local_up(free_port())
        env = dict(os.environ)
        for name, value in info.env().items():
            env[name] = value
        env.update(info.credentials or stack_info.FAKE_CREDENTIALS)  # the local AWS enforces IAM
        env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        try:
            yield info, env
        finally:
            context.local_down()
            # `local down` keeps S3 (cachevault_tools/local/durable.py): a bench's GBs are throwaway.
            shutil.rmtree(home / "s3", ignore_errors=True)
    finally:
        patch.restore()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _redis(addr: tuple[str, int]) -> redis.Redis:
    return redis.Redis(host=addr[0], port=addr[1], socket_timeout=600, socket_connect_timeout=10)


def _pids_of(addrs: list[tuple[str, int]]) -> list[int]:
    return [int(_redis(a).info("server")["process_id"]) for a in addrs]


def _op(
    name: str, anchor: str, anchor_s: float, ours_s: float, goal_key: str, correct: bool,
    states: dict[str, float], sampler: PeakSampler,
) -> dict[str, Any]:  # fmt: skip
    return {
        "operation": name,
        "anchor": anchor,
        "anchor_s": round(anchor_s, 3),
        "ours_s": round(ours_s, 3),
        "ratio": round(ours_s / anchor_s, 3) if anchor_s else None,
        "goal": GOALS[goal_key],
        "goal_kind": goal_key,
        "correct": correct,
        "states_s": states,
        "peak_rss_mb": sampler.peaks_mb,
        "cpu_s": sampler.cpu_s,
    }


def run_e2e_bench(size_mb: int, shape: str, workdir: Path, *, seed: int = 1) -> dict[str, Any]:
    """One dataset of ``shape`` and ``size_mb`` MiB through snapshot, restore and resharded restore."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    anchors: list[RedisProcess] = []
    ops: list[dict[str, Any]] = []
    try:
        with _local_stack(workdir / "home") as (info, env):
            keys = info.credentials or {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
            sfn = boto3.client(
                "stepfunctions", endpoint_url=info.endpoint_url, region_name=env["AWS_DEFAULT_REGION"],
                aws_access_key_id=keys["AWS_ACCESS_KEY_ID"], aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
            )  # fmt: skip  (the embedded AWS enforces IAM: its admin's keys)
            _, created = _cli(["cache", "create", "src", "--replicas", "1"], env)
            nodes = _extra(created["ReplicationGroup"])["Nodes"]
            primary = _address(next(n["Address"] for n in nodes if n["Role"] == "primary"))
            replica = _address(next(n["Address"] for n in nodes if n["Role"] == "replica"))
            stats = datagen.generate(*primary, size_mb, seed=seed, shape=shape)
            _redis(primary).execute_command("WAIT", 1, 600_000)
            source_digest = cache_digest([primary])[0]
            source_pids = _pids_of([primary, replica])

            # capture: redis-cli --rdb from the replica, then the product
            anchor_rdb = workdir / "anchor.rdb"
            started = time.monotonic()
            subprocess.run(
                ["redis-cli", "-h", replica[0], "-p", str(replica[1]), "--rdb", str(anchor_rdb)],
                check=True, capture_output=True, timeout=3600,
            )  # fmt: skip
            cli_s = time.monotonic() - started
            rdb_bytes = anchor_rdb.stat().st_size
            with PeakSampler([info.pid, *source_pids]) as sampler:
                secs, snap = _cli(["snapshot", "create", "src", "snap", "--wait"], env, sampler)
            snapshot = snap["Snapshot"]
            states = state_breakdown(
                sfn, _execution_arn(info.state_machine("CreateSnapshotStateMachine"), _extra(snapshot)["ExecutionName"])
            )
            captured = sum(_extra(n)["SizeBytes"] for n in snapshot["NodeSnapshots"])
            ok = snapshot["SnapshotStatus"] == "available" and captured > 0
            ops.append(_op("snapshot create --wait", "redis-cli --rdb (same replica)", cli_s, secs, "capture",
                           ok, states, sampler))  # fmt: skip

            # same-layout restores, against redis-server loading the same RDB at start-up: one node
            # (--replicas 0), then the snapshot's layout (a primary and its replica) against two
            # servers loading it in parallel, as that layout would come up from RDB files.
            restore_arn = info.state_machine("RestoreSnapshotStateMachine")
            startup_s = _time_startup([anchor_rdb], workdir / "anchor-same", anchors, 3600)
            _stop(anchors)
            with PeakSampler([info.pid]) as sampler:
                secs, _ = _cli(["restore", "snap", "single", "--replicas", "0", "--wait"], env, sampler)
            states = state_breakdown(sfn, _newest_execution(sfn, restore_arn))
            ok = cache_digest(_nodes_of(env, "single"))[0] == source_digest
            ops.append(_op("restore --wait --replicas 0 (same layout)", "redis-server start-up load", startup_s, secs,
                           "restore", ok, states, sampler))  # fmt: skip
            _cli(["cache", "delete", "single"], env)

            pair_s = _time_startup([anchor_rdb, anchor_rdb], workdir / "anchor-pair", anchors, 3600)
            _stop(anchors)
            with PeakSampler([info.pid]) as sampler:
                secs, _ = _cli(["restore", "snap", "same", "--wait"], env, sampler)
            states = state_breakdown(sfn, _newest_execution(sfn, restore_arn))
            same = _nodes_of(env, "same", role=None)
            ok = len(same) == 2 and cache_digest(same) == [source_digest, source_digest]
            ops.append(_op("restore --wait (same layout: 1 replica)", "start-up load, primary and replica in parallel",
                           pair_s, secs, "restore", ok, states, sampler))  # fmt: skip
            _cli(["cache", "delete", "same"], env)

            # resharded restore: the same data loaded at start-up into the target layout
            with PeakSampler([info.pid]) as sampler:
                reshard = ["restore", "snap", "resharded", "--shards", str(RESHARD_TO), "--replicas", "0", "--wait"]
                secs, _ = _cli(reshard, env, sampler)
            states = state_breakdown(sfn, _newest_execution(sfn, restore_arn))
            primaries = _nodes_of(env, "resharded")
            ok = combined_digest(cache_digest(primaries)) == source_digest
            shard_rdbs = _save_each(primaries, workdir)
            _cli(["cache", "delete", "resharded"], env)
            startup_s = _time_startup(shard_rdbs, workdir / "anchor-reshard", anchors, 3600)
            _stop(anchors)
            ops.append(_op(f"restore --wait --shards {RESHARD_TO}", f"start-up load into {RESHARD_TO} shards",
                           startup_s, secs, "reshard", ok, states, sampler))  # fmt: skip
    finally:  # anchor nodes never outlive the run
        _stop(anchors)
    for rdb in [anchor_rdb, *shard_rdbs]:
        rdb.unlink(missing_ok=True)
    return {
        "kind": "e2e",
        "shape": shape,
        "size_mb": size_mb,
        "rdb_bytes": rdb_bytes,
        "keys": stats.keys,
        "dataset": stats.to_dict(),
        "operations": ops,
    }


def _nodes_of(env: dict[str, str], cache: str, role: str | None = "primary") -> list[tuple[str, int]]:
    """The primaries of a cache (``role=None``: every node), from `cachevault cache describe`."""
    _, described = _cli(["cache", "describe", cache], env)
    (group,) = described["ReplicationGroups"]
    return [_address(n["Address"]) for n in _extra(group)["Nodes"] if role is None or n["Role"] == role]


def _extra(shape: dict[str, Any]) -> dict[str, Any]:
    """The cachevault fields of an ElastiCache-shaped CLI answer (its ``CacheVault`` member)."""
    return shape["CacheVault"]


def _save_each(primaries: list[tuple[str, int]], workdir: Path) -> list[Path]:
    rdbs: list[Path] = []
    for i, addr in enumerate(primaries):
        client = _redis(addr)
        client.save()
        src = Path(client.config_get("dir")["dir"]) / client.config_get("dbfilename")["dbfilename"]
        dest = workdir / f"shard-{i}.rdb"
        shutil.copyfile(src, dest)
        rdbs.append(dest)
    return rdbs


def _stop(nodes: list[RedisProcess]) -> None:
    for node in nodes:
        node.stop()
    nodes.clear()
