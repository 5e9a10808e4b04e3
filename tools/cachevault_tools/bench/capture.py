"""Capture benchmark: ``capture_rdb`` vs ``redis-cli --rdb`` from the same replica.

Both read the same point-in-time RDB over the replication protocol from a replica running
``repl-diskless-sync yes`` with no delay; the replica's fork-and-save bounds both, so the
ratio shows what our streaming (hashing, CRC, the sink) costs on top.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from cachevault.snapshot.capture import capture_rdb

from cachevault_tools import datagen
from cachevault_tools.local.redis_process import RedisProcess, node_client, start_node

MiB = 1 << 20
REDIS_CLI = "/usr/bin/redis-cli"
REPLICA_CONFIG = {"repl-diskless-sync": "yes", "repl-diskless-sync-delay": 0}


def wait_replica_synced(primary: tuple[str, int], replica: tuple[str, int], timeout: float) -> None:
    """Until the replica's link is up and its offset matches the primary's (endpoints, no AUTH)."""
    p, r = node_client(*primary, timeout=10), node_client(*replica, timeout=10)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            info = r.info("replication")
            if (
                info.get("master_link_status") == "up"
                and info.get("master_sync_in_progress") == 0
                and info["master_repl_offset"] == p.info("replication")["master_repl_offset"]
            ):
                return
            time.sleep(0.05)
    finally:
        p.close()
        r.close()
    raise TimeoutError(f"replica {replica[1]} not in sync with {primary[1]} after {timeout}s")


def _time_capture(replica: RedisProcess, out: Path) -> dict[str, Any]:
    started = time.monotonic()
    with open(out, "wb") as fh:
        res = capture_rdb(replica.host, replica.port, fh, read_timeout=120)
    return {"seconds": time.monotonic() - started, "bytes": res.size, "sha256": res.sha256, "mode": res.mode}


def _time_redis_cli(replica: RedisProcess, out: Path, timeout: float) -> dict[str, Any]:
    cli = shutil.which("redis-cli") or REDIS_CLI
    started = time.monotonic()
    proc = subprocess.run(
        [cli, "-h", replica.host, "-p", str(replica.port), "--rdb", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"redis-cli --rdb failed ({proc.returncode}): {proc.stderr.strip()}")
    return {"seconds": seconds, "bytes": out.stat().st_size}


def run_capture_bench(
    size_mb: int, workdir: Path, *, seed: int = 1, rounds: int = 1, keep_files: bool = False
) -> dict[str, Any]:
    """Generate a seeded dataset, then time both captures ``rounds`` times (alternating).

    Returns the best time of each, their ratio (ours / redis-cli) and every round.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    nodes: list[RedisProcess] = []
    timeout = max(120.0, size_mb / 10)
    try:
        primary = start_node(workdir / "primary", config=REPLICA_CONFIG)
        nodes.append(primary)
        stats = datagen.generate(primary.host, primary.port, size_mb, seed=seed)
        replica = start_node(
            workdir / "replica", config={**REPLICA_CONFIG, "replicaof": f"{primary.host} {primary.port}"}
        )
        nodes.append(replica)
        wait_replica_synced(primary.endpoint, replica.endpoint, timeout)
        ours: list[dict[str, Any]] = []
        theirs: list[dict[str, Any]] = []
        ours_file, cli_file = workdir / "capture.rdb", workdir / "redis-cli.rdb"
        for _ in range(max(1, rounds)):
            ours.append(_time_capture(replica, ours_file))
            theirs.append(_time_redis_cli(replica, cli_file, timeout))
        best_ours = min(r["seconds"] for r in ours)
        best_cli = min(r["seconds"] for r in theirs)
        rdb_bytes = ours[-1]["bytes"]
        return {
            "size_mb": size_mb,
            "seed": seed,
            "dataset": stats.to_dict(),
            "rdb_bytes": rdb_bytes,
            "redis_cli_rdb_bytes": theirs[-1]["bytes"],
            "capture_s": round(best_ours, 3),
            "redis_cli_s": round(best_cli, 3),
            "ratio": round(best_ours / best_cli, 3) if best_cli else None,
            "capture_mb_s": round(rdb_bytes / MiB / best_ours, 1) if best_ours else None,
            "rounds": {"capture": ours, "redis_cli": theirs},
        }
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(Exception):
                node.stop()
        if not keep_files:
            for name in ("capture.rdb", "redis-cli.rdb"):
                (workdir / name).unlink(missing_ok=True)
