"""Benchmark output: a markdown table, a JSON record and a PNG plot under ``bench/results/``.

``run_bench`` is the one entry point the CLI calls. The PNGs are drawn with matplotlib
(the ``[bench]`` extra). ``e2e`` (bench_e2e: the CLI commands with ``--wait`` against
anchors of the same run) gets its own files: a table of the end-to-end ratios, the
per-state breakdown and peak RSS per process, and a plot of grouped bars per dataset (left)
and the ratios with one labelled goal line per operation (right). The component
benchmarks (capture, restore) keep theirs: per dataset size, grouped bars of anchor vs
cachevault seconds and, on their own panel, the ratios with each goal line.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from cachevault_tools.bench.capture import run_capture_bench
from cachevault_tools.bench.e2e import GOALS as E2E_GOALS
from cachevault_tools.bench.e2e import SHAPES, run_e2e_bench
from cachevault_tools.bench.restore import run_restore_bench

RESULTS_DIR = Path("bench/results")
GOAL_RATIO = 1.15
Kind = Literal["capture", "restore", "e2e", "all"]


def rows_of(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten capture and restore results into table rows (one per size and variant)."""
    rows: list[dict[str, Any]] = []
    for r in results:
        if r.get("kind") == "e2e":
            for op in r["operations"]:
                rows.append({
                    "bench": "e2e", "size_mb": r["size_mb"], "variant": f"{r['shape']}: {op['operation']}",
                    "rdb_mb": round(r["rdb_bytes"] / (1 << 20), 1), "anchor": op["anchor"],
                    "anchor_s": op["anchor_s"], "ours_s": op["ours_s"], "ratio": op["ratio"],
                    "correct": op["correct"], "goal": op["goal"],
                    "peak_rss_mb": max(op["peak_rss_mb"].values(), default=None),
                })  # fmt: skip
        elif r.get("kind") == "restore":
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


_E2E_COLUMNS = ("size_mb", "variant", "rdb_mb", "anchor", "anchor_s", "ours_s", "ratio", "goal", "correct",
                "peak_rss_mb")  # fmt: skip


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = _COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def e2e_markdown(results: Sequence[dict[str, Any]]) -> str:
    """The end-to-end table, then per operation where the time went and each process's peak RSS and CPU."""
    rows = rows_of([r for r in results if r.get("kind") == "e2e"])
    parts = [markdown_table(rows, _E2E_COLUMNS)]
    parts.append(
        "\nEach figure is what a user waits for: the `cachevault` command with `--wait` (a new CLI process,"
        " the Step Functions execution in the embedded AWS started by `cachevault local up`, its Lambda"
        " handlers, S3 and the cache nodes), timed from the outside. Anchors ran in the same run on the same"
        " data: `redis-cli --rdb` from the same replica; redis-server loading the same RDB at start-up; for"
        " the resharded restore, the restored primaries' own RDBs loaded at start-up in parallel.\n"
    )
    for r in results:
        if r.get("kind") != "e2e":
            continue
        for op in r["operations"]:
            parts.append(f"\n### {r['shape']}, {r['size_mb']} MB: `{op['operation']}` ({op['ours_s']} s)\n\n")
            parts.append("| state (first entry to last exit) | seconds |\n|---|---|\n")
            parts += [f"| {name} | {sec} |\n" for name, sec in op["states_s"].items()]
            cpu = op.get("cpu_s", {})  # results written before the CPU column have none
            parts.append("\n| process | peak RSS (MB) | CPU (s) |\n|---|---|---|\n")
            parts += [f"| {name} | {mb} | {cpu.get(name, '')} |\n" for name, mb in sorted(op["peak_rss_mb"].items())]
    return "".join(parts)


_OP_COLOURS = {"capture": "tab:blue", "restore": "tab:orange", "reshard": "tab:purple"}


def plot_e2e_png(results: Sequence[dict[str, Any]]) -> bytes:
    """Left: grouped bars per dataset (cachevault solid, anchor hatched); right: ratios and goals."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e = [r for r in results if r.get("kind") == "e2e"]
    groups = [f"{r['shape']}\n{r['size_mb']} MB" for r in e2e]
    kinds = list(_OP_COLOURS)
    width = 0.8 / (2 * len(kinds))
    fig, (times, ratios) = plt.subplots(1, 2, figsize=(14, 5.2))
    for k, kind in enumerate(kinds):
        ops = [next((o for o in r["operations"] if o["goal_kind"] == kind), None) for r in e2e]
        name = next((o["operation"] for o in ops if o), kind)
        anchor = next((o["anchor"] for o in ops if o), "anchor")
        xs = [g + (2 * k) * width - 0.4 + width / 2 for g in range(len(e2e))]
        colour = _OP_COLOURS[kind]
        times.bar(xs, [o["ours_s"] if o else 0 for o in ops], width, color=colour, label=f"cachevault {name}")
        times.bar([x + width for x in xs], [o["anchor_s"] if o else 0 for o in ops], width, color=colour,
                  alpha=0.35, hatch="//", label=f"anchor: {anchor}")  # fmt: skip
        rx = [g + k * (0.8 / len(kinds)) - 0.4 + 0.4 / len(kinds) for g in range(len(e2e))]
        ratios.bar(rx, [o["ratio"] or 0 if o else 0 for o in ops], 0.8 / len(kinds), color=colour, label=name)
        ratios.axhline(E2E_GOALS[kind], linestyle="--", color=colour, linewidth=1.2,
                       label=f"goal {kind} <= {E2E_GOALS[kind]}x")  # fmt: skip
    ratios.axhline(1.0, color="black", linewidth=0.8)
    for ax in (times, ratios):
        ax.set_xticks(range(len(e2e)), groups)
    times.set(title="end to end, seconds (solid: cachevault --wait; hatched: anchor)", ylabel="seconds")
    ratios.set(title="cachevault / anchor, same run", ylabel="ratio")
    times.legend(fontsize=7)
    ratios.legend(fontsize=7)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


# ------------------------------------------------------------------------------- PNG
GOALS = {"capture": 1.1, "restore": GOAL_RATIO}  # the issues' goals, drawn on the ratio panel


GOAL_COLOURS = {"capture": "#d62728", "restore": "#9467bd"}  # one colour per goal line, none used by a bar


def plot_png(rows: Sequence[dict[str, Any]]) -> bytes:
    """Grouped bars per dataset size: seconds (one panel per bench, anchor hatched beside
    cachevault) and, on their own panel, the ratio cachevault/anchor with each goal a labelled
    line in its own colour; the ratio axis is scaled to the goals, taller bars are cut at the
    top with their value written on them."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to PNG
    import matplotlib.pyplot as plt

    benches = [b for b in ("capture", "restore") if any(r["bench"] == b for r in rows)]
    series = list(dict.fromkeys((r["bench"], r["variant"]) for r in rows))  # in run order
    colour = {key: f"C{i % 10}" for i, key in enumerate(series)}
    sizes = sorted({r["size_mb"] for r in rows})
    at = {(r["bench"], r["variant"], r["size_mb"]): r for r in rows}

    fig = plt.figure(figsize=(12, 9))
    grid = fig.add_gridspec(2, max(1, len(benches)), height_ratios=[1, 1])
    for column, bench in enumerate(benches):
        ax = fig.add_subplot(grid[0, column])
        keys = [k for k in series if k[0] == bench]
        width = 0.8 / (2 * len(keys))
        for i, key in enumerate(keys):
            for j, size in enumerate(sizes):
                row = at.get((*key, size))
                if row is None:
                    continue
                left = j - 0.4 + 2 * i * width
                ax.bar(left, row["anchor_s"], width, align="edge", color=colour[key], alpha=0.35, hatch="//",
                       edgecolor=colour[key], label=f"{key[1]}: {row['anchor']}" if j == 0 else None)
                ax.bar(left + width, row["ours_s"], width, align="edge", color=colour[key],
                       label=f"{key[1]}: cachevault" if j == 0 else None)  # fmt: skip
        ax.set_xticks(range(len(sizes)), [_size_label(s) for s in sizes])
        ax.set(title=f"{bench}: seconds (hatched = anchor, same run)", xlabel="dataset", ylabel="seconds")
        ax.legend(fontsize=8, loc="upper left")

    ratios = fig.add_subplot(grid[1, :])
    width = 0.8 / max(1, len(series))
    goals = {b: g for b, g in GOALS.items() if b in benches}
    top = max([*goals.values(), 1.0]) * 1.3
    for i, key in enumerate(series):
        for j, size in enumerate(sizes):
            row = at.get((*key, size))
            if row is None:
                continue
            x = j - 0.4 + i * width
            ratios.bar(x, min(row["ratio"], top), width, align="edge", color=colour[key],
                       label=f"{key[0]}: {key[1]}" if j == 0 else None)  # fmt: skip
            over = row["ratio"] > top
            ratios.text(x + width / 2, top - 0.02 if over else row["ratio"] + 0.01,
                        f"{row['ratio']:.2f}" + (" ↑" if over else ""), ha="center", va="top" if over else "bottom",
                        fontsize=7, color="white" if over else "black")  # fmt: skip
    ratios.axhline(1.0, color="black", linewidth=0.8)
    ratios.text(len(sizes) - 0.4, 1.0, " parity 1.0", va="top", fontsize=8)
    for n, (bench, goal) in enumerate(sorted(goals.items(), key=lambda kv: kv[1])):
        ratios.axhline(goal, color=GOAL_COLOURS[bench], linestyle="--", linewidth=1.5, label=f"{bench} goal <= {goal}")
        # the lowest goal's label under its line, the others above theirs: close goals stay readable
        ratios.text(len(sizes) - 0.4, goal, f" {bench} goal {goal}", va="top" if n == 0 else "bottom", fontsize=8,
                    color=GOAL_COLOURS[bench])  # fmt: skip
    ratios.set_xlim(-0.5, len(sizes) - 0.5 + 0.7)
    ratios.set_ylim(0, top)
    ratios.set_xticks(range(len(sizes)), [_size_label(s) for s in sizes])
    ratios.set(title="cachevault / anchor (lower is better; bars past the axis show their value)",
               xlabel="dataset", ylabel="ratio")  # fmt: skip
    ratios.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def _size_label(size_mb: int) -> str:
    return f"{size_mb // 1024} GiB" if size_mb % 1024 == 0 else f"{size_mb} MiB"


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
        "\n![plot](" + paths["png"].name + ")\n\nPlot: top, seconds per dataset size (hatched = the anchor measured"
        " in the same run, solid = cachevault); bottom, ratio cachevault/anchor with each goal as a dashed line.\n"
    )
    if name == "e2e":
        legend = (
            "\n![plot](" + paths["png"].name + ")\n\nPlot: left, seconds per dataset (solid = cachevault"
            " command with --wait, hatched = its anchor); right, ratio with each goal as a dashed line of the"
            " operation's colour.\n"
        )
        paths["md"].write_text(f"# end-to-end benchmark, {stamp}\n\n{machine()}\n\n" + e2e_markdown(results) + legend)
        paths["png"].write_bytes(plot_e2e_png(results))
        return paths
    paths["md"].write_text(f"# {name} benchmark, {stamp}\n\n{machine()}\n\n" + markdown_table(rows) + legend)
    paths["png"].write_bytes(plot_png(rows))
    return paths


def run_bench(
    kind: Kind,
    sizes_mb: list[int],
    workdir: Path,
    *,
    outdir: Path = RESULTS_DIR,
    shapes: Sequence[str] = SHAPES,
) -> list[dict[str, Any]]:
    """Run the benchmarks per size, print the tables, write bench/results/.

    ``e2e``: the CLI commands end to end for every shape; ``capture``/``restore``: the
    component benchmarks; ``all``: e2e first, then the components as the breakdown.
    """
    if kind not in ("capture", "restore", "e2e", "all"):
        raise ValueError(f"unknown bench kind {kind!r}: capture, restore, e2e or all")
    results: list[dict[str, Any]] = []
    if kind in ("e2e", "all"):
        e2e = [
            run_e2e_bench(size, shape, Path(workdir) / f"e2e-{shape}-{size}")
            for size in sizes_mb
            for shape in shapes
        ]
        paths = write_results("e2e", e2e, outdir)
        print(e2e_markdown(e2e), end="")
        print(f"written: {', '.join(str(p) for p in paths.values())}")
        results += e2e
    if kind == "e2e":
        return results
    components: list[dict[str, Any]] = []
    for size in sizes_mb:
        if kind in ("capture", "all"):
            res = run_capture_bench(size, Path(workdir) / f"capture-{size}")
            res["kind"] = "capture"
            components.append(res)
        if kind in ("restore", "all"):
            components.append(run_restore_bench(size, Path(workdir) / f"restore-{size}"))
    paths = write_results("components" if kind == "all" else kind, components, outdir)
    print(markdown_table(rows_of(components)), end="")
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return results + components
