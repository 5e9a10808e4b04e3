"""One large shard through the product as a user runs it, for memory rather than speed:
``python -m cachevault_tools.bench.large_shard SIZE_MB [WORKDIR]``.

A `cachevault local up` server (bench_e2e's), a cache of one primary and no replica (a
replica would double the data in this machine's memory) filled with strings of 8 MiB (datagen's
``large-strings``: redis-server holds them at ~1 byte per byte, where the mixed large values
of ``make bench`` take ~1.23 in jemalloc's size classes, so 20 GB fits this 24 GB machine), then
``snapshot create --wait``, the source deleted, ``restore --wait --replicas 0`` (a seeded
restore) and DEBUG DIGEST of both. Prints, and writes to ``bench/results/large-<time>.json``,
the seconds of each command and the peak RSS of every process involved, so what does not
grow with the dataset shows against a 1 GB run of ``make bench``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cachevault.restore.verify import cache_digest

from cachevault_tools import datagen
from cachevault_tools.bench.e2e import PeakSampler, _address, _cli, _extra, _local_stack, _nodes_of, _pids_of, _redis

RESULTS = Path(__file__).resolve().parents[3] / "bench" / "results"


def run_large_shard(size_mb: int, workdir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"kind": "large-shard", "size_mb": size_mb, "shape": "large-strings"}
    with _local_stack(workdir / "home") as (info, env):
        _, created = _cli(["cache", "create", "big", "--replicas", "0"], env)
        primary = _address(next(n["Address"] for n in _extra(created["ReplicationGroup"])["Nodes"]))
        started = time.monotonic()
        stats = datagen.generate(*primary, size_mb, seed=3, shape="large-strings", timeout=7200)
        result |= {"fill_s": round(time.monotonic() - started, 1), "keys": stats.keys}
        digest = cache_digest([primary])[0]
        result["source_used_memory_mb"] = round(_redis(primary).info("memory")["used_memory"] / 2**20, 1)
        with PeakSampler([info.pid, *_pids_of([primary])]) as sampler:
            seconds, snap = _cli(["snapshot", "create", "big", "bigsnap", "--wait"], env, sampler)
        result["snapshot"] = {
            "seconds": round(seconds, 1),
            "rdb_bytes": sum(_extra(n)["SizeBytes"] for n in snap["Snapshot"]["NodeSnapshots"]),
            "peak_rss_mb": sampler.peaks_mb,
        }
        _cli(["cache", "delete", "big"], env)  # its memory back before the restore needs as much
        with PeakSampler([info.pid]) as sampler:
            seconds, _ = _cli(["restore", "bigsnap", "bigback", "--replicas", "0", "--wait"], env, sampler)
        result["restore"] = {"seconds": round(seconds, 1), "peak_rss_mb": sampler.peaks_mb}
        result["digest_equal"] = cache_digest(_nodes_of(env, "bigback"))[0] == digest
        _cli(["cache", "delete", "bigback"], env)
    return result


def main(argv: list[str]) -> int:
    size_mb = int(argv[0])
    workdir = Path(argv[1]) if len(argv) > 1 else Path(tempfile.mkdtemp(prefix="cachevault-large-"))
    result = run_large_shard(size_mb, workdir)
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
    result["when"] = stamp
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"large-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written: {path}")
    return 0 if result["digest_equal"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
