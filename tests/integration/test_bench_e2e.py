"""The end-to-end bench (bench_e2e) at a tiny size: the CLI commands with --wait through a
`cachevault local up` server, anchors of the same run, per-state breakdown, peak RSS, report files."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import matplotlib.image
from cachevault_tools import datagen
from cachevault_tools.bench.e2e import GOALS, SHAPES, _cpu_s, run_e2e_bench
from cachevault_tools.bench.report import write_results
from cachevault_tools.cli import bench_cmd
from cachevault_tools.local.redis_process import start_node


def test_e2e_bench_small_run_and_report(tmp_path: Path) -> None:
    result = run_e2e_bench(4, "large-values", tmp_path / "run")
    ops = {op["goal_kind"]: op for op in result["operations"]}
    assert set(ops) == set(GOALS)
    for op in ops.values():
        assert op["correct"] is True, op
        assert op["anchor_s"] > 0 and op["ours_s"] > op["anchor_s"] * 0.1
        assert {"embedded AWS", "cachevault CLI", "redis-server"} <= set(op["peak_rss_mb"]), op["peak_rss_mb"]
        assert set(op["cpu_s"]) <= set(op["peak_rss_mb"]), op["cpu_s"]
        # A new Python process imports boto3 and the CLI: never less than a tick of CPU.
        assert op["cpu_s"]["cachevault CLI"] > 0 and op["cpu_s"]["embedded AWS"] > 0, op["cpu_s"]
        assert "redis-server" in op["cpu_s"], op["cpu_s"]
    assert {"CaptureShards", "WriteManifest"} <= set(ops["capture"]["states_s"])
    assert {"ProvisionCache", "LoadShards", "Verify"} <= set(ops["reshard"]["states_s"])
    assert result["keys"] > 0 and result["rdb_bytes"] > 4 << 20

    paths = write_results("e2e", [result], tmp_path / "out")
    record = json.loads(paths["json"].read_text())
    assert [r["variant"] for r in record["rows"]] == [f"large-values: {op['operation']}" for op in result["operations"]]
    text = paths["md"].read_text()
    assert "| size_mb | variant |" in text and "first entry to last exit" in text
    assert "| process | peak RSS (MB) | CPU (s) |" in text
    png = paths["png"].read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    pixels = matplotlib.image.imread(paths["png"])
    assert pixels.shape[:2] == (height, width) and width > 800
    assert pixels[..., :3].min() < 0.5


def test_shapes_agree_between_cli_and_bench() -> None:
    assert tuple(bench_cmd.SHAPES) == SHAPES and set(SHAPES) <= set(datagen.SHAPES)


def test_cpu_seconds_of_a_process_match_its_own_clock() -> None:
    """_cpu_s reads proc(5)'s utime + stime: for this process, what time.process_time() says."""
    start = time.process_time()
    while time.process_time() - start < 0.3:  # bounded: this loop burns 0.3 s of CPU
        pass
    assert abs(_cpu_s(os.getpid()) - time.process_time()) < 0.05  # a clock tick is 10 ms
    assert _cpu_s(2**22 + 1) is None  # above pid_max's limit: no such process


def test_large_shard_run_at_a_tiny_size(tmp_path: Path) -> None:
    """The large-shard memory run (bench/large_shard.py) end to end at 16 MiB (three 8 MiB strings): digests equal,
    a seeded restore, and the peaks of the processes it reports."""
    from cachevault_tools.bench.large_shard import run_large_shard

    result = run_large_shard(16, tmp_path / "run")
    assert result["digest_equal"] is True and result["keys"] > 0
    assert result["snapshot"]["rdb_bytes"] > 16 << 20
    assert {"embedded AWS", "cachevault CLI", "redis-server"} <= set(result["snapshot"]["peak_rss_mb"])
    assert "ECS worker (seed)" in result["restore"]["peak_rss_mb"]  # the restore was seeded


def test_large_strings_take_one_byte_of_server_memory_per_byte(tmp_path: Path) -> None:
    """large_shard's data: written by SET and loaded from an RDB, each value is one allocation
    of its size class, so 20 GB of it fits a 24 GB machine (README, Benchmarks)."""
    node = start_node(tmp_path / "node")
    try:
        conn = node.client(timeout=30)
        empty = conn.info("memory")["used_memory"]
        stats = datagen.generate(node.host, node.port, 48, shape="large-strings")
        assert stats.keys == 7 and stats.payload_bytes == 7 * datagen.EXACT_STRING_BYTES
        # Each value as SET left it: one 8 MiB block (MEMORY USAGE: the allocation, not the
        # connection's next 8 MiB query buffer, which the server frees on its own time).
        for key in conn.keys("*"):
            assert 8 << 20 <= conn.memory_usage(key, samples=0) < (8 << 20) + 1024
        conn.execute_command("DEBUG", "RELOAD")  # as a restore's node loads it
        loaded = conn.info("memory")["used_memory"] - empty
        assert stats.payload_bytes <= loaded < 1.01 * stats.payload_bytes  # the mixed large values: ~1.23
        assert conn.dbsize() == stats.keys
    finally:
        node.stop()
