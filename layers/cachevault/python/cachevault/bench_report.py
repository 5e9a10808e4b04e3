"""Benchmark output: a markdown table, a JSON record and a PNG plot under ``bench/results/``.

``run_bench`` is the one entry point the CLI calls. The PNG is drawn without matplotlib
(not a dependency): per dataset size, grouped bars of anchor vs cachevault seconds (left)
and the ratio with the 1.15 goal line (right); the markdown table carries the numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from cachevault.bench_capture import run_capture_bench
from cachevault.bench_restore import run_restore_bench

RESULTS_DIR = Path("bench/results")
GOAL_RATIO = 1.15
Kind = Literal["capture", "restore", "all"]


def rows_of(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten capture and restore results into table rows (one per size and variant)."""
    rows: list[dict[str, Any]] = []
    for r in results:
        if r.get("kind") == "restore":
            for v in r["variants"]:
                mem = v.get("memory", {})
                rows.append({
                    "bench": "restore", "size_mb": r["size_mb"], "variant": v["variant"],
                    "rdb_mb": round(v["rdb_bytes"] / (1 << 20), 1), "anchor": "redis-server start-up load",
                    "anchor_s": v["anchor_s"], "ours_s": v["restore_s"], "ratio": v["ratio"],
                    "correct": v.get("digest_equal"), "anon_mb_per_gb": mem.get("anon_mb_per_gb"),
                    "rss_mb_per_gb": mem.get("rss_mb_per_gb"),
                })  # fmt: skip
        else:
            rows.append({
                "bench": "capture", "size_mb": r["size_mb"], "variant": "one shard",
                "rdb_mb": round(r["rdb_bytes"] / (1 << 20), 1), "anchor": "redis-cli --rdb",
                "anchor_s": r["redis_cli_s"], "ours_s": r["capture_s"], "ratio": r["ratio"],
                "correct": r["rdb_bytes"] == r.get("redis_cli_rdb_bytes"),
                "anon_mb_per_gb": r.get("memory", {}).get("anon_mb_per_gb"),
                "rss_mb_per_gb": r.get("memory", {}).get("rss_mb_per_gb"),
            })  # fmt: skip
    return rows


_COLUMNS = ("bench", "size_mb", "variant", "rdb_mb", "anchor", "anchor_s", "ours_s", "ratio", "correct",
            "anon_mb_per_gb", "rss_mb_per_gb")  # fmt: skip


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row[c]) for c in _COLUMNS) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- PNG
_W, _H, _PAD = 900, 420, 30
_ANCHOR, _OURS, _RATIO, _GOAL, _AXIS = (120, 120, 120), (30, 110, 200), (220, 80, 40), (40, 160, 60), (0, 0, 0)


class _Canvas:
    def __init__(self, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def rect(self, x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int]) -> None:
        x0, x1 = sorted((max(0, min(self.w, x0)), max(0, min(self.w, x1))))
        y0, y1 = sorted((max(0, min(self.h, y0)), max(0, min(self.h, y1))))
        row = bytes(rgb) * (x1 - x0)
        for y in range(y0, y1):
            at = (y * self.w + x0) * 3
            self.px[at : at + len(row)] = row

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3 : (y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        return b"\x89PNG\r\n\x1a\n" + body


def plot_png(rows: Sequence[dict[str, Any]]) -> bytes:
    """Left: anchor (grey) vs ours (blue) seconds per row; right: ratio (orange), goal 1.15 (green)."""
    c = _Canvas(_W, _H)
    half = _W // 2
    base = _H - _PAD
    top_s = max([r["anchor_s"] or 0 for r in rows] + [r["ours_s"] or 0 for r in rows] + [1e-9])
    top_r = max([r["ratio"] or 0 for r in rows] + [GOAL_RATIO * 1.2])
    n = max(1, len(rows))
    slot = (half - 2 * _PAD) // n
    for i, r in enumerate(rows):
        x = _PAD + i * slot
        bar = max(2, slot // 3)
        c.rect(x, base, x + bar, base - int((r["anchor_s"] or 0) / top_s * (base - _PAD)), _ANCHOR)
        c.rect(x + bar, base, x + 2 * bar, base - int((r["ours_s"] or 0) / top_s * (base - _PAD)), _OURS)
        rx = half + _PAD + i * slot
        c.rect(rx, base, rx + bar * 2, base - int((r["ratio"] or 0) / top_r * (base - _PAD)), _RATIO)
    goal_y = base - int(GOAL_RATIO / top_r * (base - _PAD))
    c.rect(half + _PAD // 2, goal_y - 1, _W - _PAD // 2, goal_y + 1, _GOAL)
    one_y = base - int(1.0 / top_r * (base - _PAD))
    c.rect(half + _PAD // 2, one_y, _W - _PAD // 2, one_y + 1, _AXIS)
    for x0 in (_PAD // 2, half + _PAD // 2):  # axes
        c.rect(x0, base, x0 + half - _PAD, base + 2, _AXIS)
        c.rect(x0, _PAD // 2, x0 + 2, base, _AXIS)
    return c.png()


def write_results(name: str, results: Sequence[dict[str, Any]], outdir: Path = RESULTS_DIR) -> dict[str, Path]:
    """Write ``<name>-<date>.json``, ``.md`` and ``.png`` to ``outdir``; returns their paths."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    rows = rows_of(results)
    paths = {ext: outdir / f"{name}-{stamp}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps({"date": stamp, "rows": rows, "results": list(results)}, indent=2,
                                        default=str))  # fmt: skip
    legend = (
        "\n![plot](" + paths["png"].name + ")\n\nPlot: left, seconds per row (grey = anchor, blue = cachevault);"
        f" right, ratio cachevault/anchor (orange), goal {GOAL_RATIO} (green line), 1.0 (black line).\n"
    )
    paths["md"].write_text(f"# {name} benchmark, {stamp}\n\n" + markdown_table(rows) + legend)
    paths["png"].write_bytes(plot_png(rows))
    return paths


def run_bench(kind: Kind, sizes_mb: list[int], workdir: Path, *, outdir: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Run the capture and/or restore benchmarks per size, print the table, write bench/results/."""
    if kind not in ("capture", "restore", "all"):
        raise ValueError(f"unknown bench kind {kind!r}: capture, restore or all")
    results: list[dict[str, Any]] = []
    for size in sizes_mb:
        if kind in ("capture", "all"):
            res = run_capture_bench(size, Path(workdir) / f"capture-{size}")
            res["kind"] = "capture"
            results.append(res)
        if kind in ("restore", "all"):
            results.append(run_restore_bench(size, Path(workdir) / f"restore-{size}"))
    paths = write_results(kind, results, outdir)
    print(markdown_table(rows_of(results)), end="")
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return results
