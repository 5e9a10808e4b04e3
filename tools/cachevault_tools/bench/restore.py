"""Restore benchmark: cachevault's network restore vs redis-server loading the same RDB at start-up.

One run, one seeded dataset, anchors measured in the same run on the same box:

- standalone: ``load_rdb_file`` into a fresh empty node (no replicas) vs a fresh
  redis-server started on the RDB (process start -> ``loading:0``);
- replica: the product's path into a cache with one replica: the replica joins the empty
  primary, follows the restore through the replication stream, and is timed until it caught up
  (offsets equal), vs the same start-up anchor;
- reshard: three shard RDBs (made by splitting the dataset over a 3-shard cluster) restored
  into a 4-shard cluster, vs three redis-servers loading the three RDBs at start-up in
  parallel. The three loads run in parallel processes; the state machine's Map runs them one
  at a time (MaxConcurrency 1): on 2 cores parallel LoadShards were no faster end to end (3 -> 4
  shards, 512 MB of small keys: 7.4-9.5 s parallel in 5 runs, 7.9-9.8 s one at a time in 4).

Every variant checks DEBUG DIGEST against the source (combined over shards for 3 -> 4), and
records the restoring process' peak memory: VmHWM includes the mmap'd file pages it touched,
RssAnon is the process' own memory; both are reported per GB of RDB restored.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
from cachevault.nodes.slots import parse_slot_ranges
from cachevault.restore.load import LoadResult, TargetShard, load_rdb_file
from cachevault.restore.verify import cache_digest, combined_digest

from cachevault_tools import datagen
from cachevault_tools.bench.capture import wait_replica_synced
from cachevault_tools.local.fleet import Fleet
from cachevault_tools.local.redis_process import RedisProcess, start_node

MiB = 1 << 20
GiB = 1 << 30
_SAMPLE_S = 0.02


def _status_kb(fields: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in fields:
                out[name] = int(rest.split()[0])
    return out


class MemoryProbe:
    """Peak RSS of this process during a block, above the baseline at its start."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self.base: dict[str, int] = {}
        self.peak_anon_kb = 0
        self.peak_hwm_kb = 0
        self._thread = threading.Thread(target=self._run, name="rss-probe", daemon=True)

    def __enter__(self) -> MemoryProbe:
        # Reset VmHWM to the current RSS (Linux >= 4.0) so the peak is this block's.
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        self.base = _status_kb(("VmRSS", "RssAnon", "VmHWM"))
        self.peak_anon_kb = self.base.get("RssAnon", 0)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(_SAMPLE_S):
            self.peak_anon_kb = max(self.peak_anon_kb, _status_kb(("RssAnon",)).get("RssAnon", 0))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2.0)
        now = _status_kb(("RssAnon", "VmHWM"))
        self.peak_anon_kb = max(self.peak_anon_kb, now.get("RssAnon", 0))
        self.peak_hwm_kb = now.get("VmHWM", 0)

    def report(self, restored_bytes: int) -> dict[str, Any]:
        gb = max(restored_bytes, 1) / GiB
        anon = max(0, self.peak_anon_kb - self.base.get("RssAnon", 0)) / 1024
        hwm = max(0, self.peak_hwm_kb - self.base.get("VmRSS", 0)) / 1024
        return {
            "baseline_rss_mb": round(self.base.get("VmRSS", 0) / 1024, 1),
            "peak_anon_delta_mb": round(anon, 1),
            "peak_rss_delta_mb": round(hwm, 1),  # includes touched pages of the mmap'd RDB
            "anon_mb_per_gb": round(anon / gb, 1),
            "rss_mb_per_gb": round(hwm / gb, 1),
        }


def _stop_all(nodes: list[RedisProcess]) -> None:
    for node in reversed(nodes):
        with contextlib.suppress(Exception):
            node.stop()
    nodes.clear()


def _digest(node: RedisProcess) -> str:
    return cache_digest([node.endpoint])[0]


def _save_to(node: RedisProcess, dest: Path) -> None:
    client = node.client(timeout=600)
    try:
        client.save()
    finally:
        client.close()
    shutil.copyfile(node.data_dir / "dump.rdb", dest)


def _make_source(size_mb: int, workdir: Path, seed: int, nodes: list[RedisProcess]) -> dict[str, Any]:
    source = start_node(workdir / "source", timeout=120)
    nodes.append(source)
    stats = datagen.generate(source.host, source.port, size_mb, seed=seed)
    rdb = workdir / "source.rdb"
    _save_to(source, rdb)
    digest = _digest(source)
    _stop_all(nodes)
    return {"rdb": rdb, "digest": digest, "dataset": stats.to_dict()}


def _time_startup(rdbs: list[Path], workdir: Path, nodes: list[RedisProcess], timeout: float) -> float:
    """Start one redis-server per RDB in parallel; seconds until all report ``loading:0``."""
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(rdbs)) as pool:
        futures = [
            pool.submit(start_node, workdir / f"anchor-{i}", rdb_file=rdb, timeout=timeout)
            for i, rdb in enumerate(rdbs)
        ]
        for fut in futures:
            nodes.append(fut.result())
    return time.monotonic() - started


def _result_row(variant: str, anchor: float, seconds: float, load: LoadResult, rdb_bytes: int) -> dict[str, Any]:
    return {
        "variant": variant,
        "anchor_s": round(anchor, 3),
        "restore_s": round(seconds, 3),
        "ratio": round(seconds / anchor, 3) if anchor else None,
        "keys": load.keys_loaded,
        "keys_expired_skipped": load.keys_expired_skipped,
        "rdb_bytes": rdb_bytes,
        "restore_mb_s": round(rdb_bytes / MiB / seconds, 1) if seconds else None,
        "function_libraries": load.function_libraries_loaded,
    }


def _standalone(rdb: Path, digest: str, anchor: float, workdir: Path, nodes: list[RedisProcess]) -> dict[str, Any]:
    target = start_node(workdir / "target", timeout=60)
    nodes.append(target)
    with MemoryProbe() as probe:
        started = time.monotonic()
        load = load_rdb_file(rdb, [TargetShard(target.host, target.port)], cluster_mode=False)
        seconds = time.monotonic() - started
    row = _result_row("standalone", anchor, seconds, load, rdb.stat().st_size)
    got = _digest(target)
    row |= {"digest_equal": got == digest, "memory": probe.report(rdb.stat().st_size)}
    _stop_all(nodes)
    return row


def _with_replica(rdb: Path, digest: str, anchor: float, workdir: Path) -> dict[str, Any]:
    """The product's path (RestoreSnapshot over the network): the replica joins the empty
    primary first and follows the load; timed until its offset equals the primary's."""
    fleet = Fleet(workdir / "fleet", ready_timeout=60)
    timeout = max(120.0, rdb.stat().st_size / MiB)
    try:
        layout = fleet.create_cache("bench-rep", cluster_mode=False, replicas_per_shard=1)
        primary, replica = layout.shards[0].primary, layout.shards[0].replicas[0]
        with MemoryProbe() as probe:
            started = time.monotonic()
            load = load_rdb_file(rdb, [TargetShard(primary.host, primary.port)], cluster_mode=False)
            loaded = time.monotonic() - started
            wait_replica_synced(primary.endpoint, replica.endpoint, timeout)
            seconds = time.monotonic() - started
        row = _result_row("one-replica", anchor, seconds, load, rdb.stat().st_size)
        row |= {
            "primary_loaded_s": round(loaded, 3),
            "replica_caught_up_s": round(seconds - loaded, 3),
            "digest_equal": cache_digest([n.endpoint for n in layout.nodes]) == [digest, digest],
            "memory": probe.report(rdb.stat().st_size),
        }
        return row
    finally:
        fleet.stop_all()


def _load_worker(args: tuple[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One Map iteration: one source RDB into every target (runs in its own process)."""
    path, targets = args
    shards = [TargetShard(t["host"], t["port"], parse_slot_ranges(t["slots"])) for t in targets]
    with MemoryProbe() as probe:
        load = load_rdb_file(path, shards, cluster_mode=True)
    return {"load": load.to_dict(), "keys": load.keys_loaded, "libs": load.function_libraries_loaded,
            "memory": probe.report(Path(path).stat().st_size)}  # fmt: skip


def _cluster_targets(fleet: Fleet, name: str) -> list[dict[str, Any]]:
    layout = fleet.get_cache(name)
    return [{"host": s.primary.host, "port": s.primary.port, "slots": s.slots} for s in layout.shards]


def _digests_of(targets: list[dict[str, Any]]) -> list[str]:
    return cache_digest([(t["host"], t["port"]) for t in targets])


def _reshard(
    rdb: Path, digest: str, shards_from: int, shards_to: int, workdir: Path, nodes: list[RedisProcess]
) -> dict[str, Any]:
    fleet = Fleet(workdir / "fleet", ready_timeout=120)
    try:
        # Setup (not timed): split the dataset over a `shards_from` cluster, save each shard.
        fleet.create_cache("bench-src", cluster_mode=True, num_shards=shards_from, replicas_per_shard=0)
        src = _cluster_targets(fleet, "bench-src")
        load_rdb_file(rdb, [TargetShard(t["host"], t["port"], parse_slot_ranges(t["slots"])) for t in src],
                      cluster_mode=True)  # fmt: skip
        shard_rdbs: list[Path] = []
        for i, t in enumerate(src):
            client = redis.Redis(host=t["host"], port=t["port"], socket_timeout=600)
            try:
                client.save()
                data_dir = Path(client.config_get("dir")["dir"])
            finally:
                client.close()
            shard_rdbs.append(workdir / f"shard-{i}.rdb")
            shutil.copyfile(data_dir / "dump.rdb", shard_rdbs[-1])
        source_digest = combined_digest(_digests_of(src))
        fleet.destroy_cache("bench-src")
        total = sum(p.stat().st_size for p in shard_rdbs)

        anchor = _time_startup(shard_rdbs, workdir, nodes, timeout=max(120.0, total / MiB))
        _stop_all(nodes)

        fleet.create_cache("bench-dst", cluster_mode=True, num_shards=shards_to, replicas_per_shard=0)
        dst = _cluster_targets(fleet, "bench-dst")
        ctx = multiprocessing.get_context("fork")
        started = time.monotonic()
        with ctx.Pool(len(shard_rdbs)) as pool:
            parts = pool.map(_load_worker, [(str(p), dst) for p in shard_rdbs])
        seconds = time.monotonic() - started
        target_digest = combined_digest(_digests_of(dst))
        keys = sum(p["keys"] for p in parts)
        anon = max(p["memory"]["peak_anon_delta_mb"] for p in parts)
        biggest = max(p.stat().st_size for p in shard_rdbs)
        return {
            "variant": f"{shards_from}->{shards_to} shards",
            "anchor_s": round(anchor, 3),
            "restore_s": round(seconds, 3),
            "ratio": round(seconds / anchor, 3) if anchor else None,
            "keys": keys,
            "rdb_bytes": total,
            "restore_mb_s": round(total / MiB / seconds, 1) if seconds else None,
            "digest_equal": target_digest == source_digest == digest,
            "source_combined_digest": source_digest,
            "target_combined_digest": target_digest,
            "memory": {
                "per_process_peak_anon_delta_mb": anon,
                "anon_mb_per_gb": round(anon / (biggest / GiB), 1),
                "per_process": [p["memory"] for p in parts],
            },
        }
    finally:
        fleet.stop_all()


def run_restore_bench(
    size_mb: int,
    workdir: Path,
    *,
    seed: int = 1,
    shards_from: int = 3,
    shards_to: int = 4,
    variants: tuple[str, ...] = ("standalone", "one-replica", "reshard"),
    keep_files: bool = False,
) -> dict[str, Any]:
    """Generate ``size_mb`` MiB of seeded data, save it, time every restore variant against its anchor."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    nodes: list[RedisProcess] = []
    try:
        made = _make_source(size_mb, workdir, seed, nodes)
        rdb: Path = made["rdb"]
        timeout = max(120.0, rdb.stat().st_size / MiB)
        anchor = _time_startup([rdb], workdir, nodes, timeout)
        anchor_ok = _digest(nodes[0]) == made["digest"]
        _stop_all(nodes)
        rows: list[dict[str, Any]] = []
        if "standalone" in variants:
            rows.append(_standalone(rdb, made["digest"], anchor, workdir, nodes))
        if "one-replica" in variants:
            rows.append(_with_replica(rdb, made["digest"], anchor, workdir))
        if "reshard" in variants:
            rows.append(_reshard(rdb, made["digest"], shards_from, shards_to, workdir, nodes))
        return {
            "kind": "restore",
            "size_mb": size_mb,
            "seed": seed,
            "cpus": os.cpu_count(),
            "dataset": made["dataset"],
            "rdb_bytes": rdb.stat().st_size,
            "source_digest": made["digest"],
            "anchor_startup_s": round(anchor, 3),
            "anchor_digest_equal": anchor_ok,
            "variants": rows,
        }
    finally:
        _stop_all(nodes)
        if not keep_files:
            for p in workdir.glob("*.rdb"):
                p.unlink(missing_ok=True)
