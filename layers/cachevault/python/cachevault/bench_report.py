"""Benchmark output: a markdown table, a JSON record and a PNG plot under ``bench/results/``.

``run_bench`` is the one entry point the CLI calls. The PNG is drawn without matplotlib
(not a dependency): per dataset size, grouped bars of anchor vs cachevault seconds (left)
and the ratio with the 1.15 goal line (right); the markdown table carries the numbers.
"""

from __future__ import annotations

import datetime as dt
import json
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
GOALS = {"capture": 1.1, "restore": GOAL_RATIO}  # the issues' goals, drawn on the ratio panel


def plot_png(rows: Sequence[dict[str, Any]]) -> bytes:
    """Seconds (ours solid, anchor dashed) and ratio per dataset size, one line per variant."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to PNG
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(f"{r['bench']}: {r['variant']}", []).append(r)
    fig, (times, ratios) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, points in series.items():
        points = sorted(points, key=lambda r: r["size_mb"])
        sizes = [r["size_mb"] for r in points]
        line = times.plot(sizes, [r["ours_s"] for r in points], marker="o", label=f"{label} (cachevault)")[0]
        times.plot(sizes, [r["anchor_s"] for r in points], marker="x", linestyle="--", color=line.get_color(),
                   label=f"{label} ({points[0]['anchor']})")  # fmt: skip
        ratios.plot(sizes, [r["ratio"] for r in points], marker="o", color=line.get_color(), label=label)
    for bench, goal in GOALS.items():
        if any(r["bench"] == bench for r in rows):
            ratios.axhline(goal, linestyle=":", color="green", label=f"{bench} goal {goal}")
    ratios.axhline(1.0, color="black", linewidth=0.8)
    times.set(title="time per dataset size", xlabel="dataset (MB)", ylabel="seconds")
    ratios.set(title="cachevault / anchor (same run)", xlabel="dataset (MB)", ylabel="ratio")
    times.legend(fontsize=7)
    ratios.legend(fontsize=7)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def machine() -> str:
    """What the numbers were measured on (they mean little without it)."""
    import os
    import platform
    import subprocess

    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False).stdout.split()
    version = next((w.removeprefix("v=") for w in redis if w.startswith("v=")), "?")
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (
        f"Machine: {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.system()} {platform.release()}, "
        f"redis-server {version}, Python {platform.python_version()}."
    )


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
        "\n![plot](" + paths["png"].name + ")\n\nPlot: left, seconds per dataset size (solid = cachevault,"
        " dashed = the anchor measured in the same run); right, ratio cachevault/anchor with the goals (dotted).\n"
    )
    paths["md"].write_text(f"# {name} benchmark, {stamp}\n\n{machine()}\n\n" + markdown_table(rows) + legend)
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
