"""cachevault bench e2e|capture|restore|all: ratios against anchors measured in the same run.

``e2e`` times the CLI commands with ``--wait`` through the state machines and the embedded
S3 (bench_e2e); ``capture``/``restore`` are the component benchmarks; ``all`` runs both.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from cachevault_tools.cli.output import add_json_flag, emit

SHAPES = ("small-keys", "large-values")  # cachevault_tools.bench.e2e.SHAPES, without its imports


def register(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks against redis-cli --rdb and redis-server start-up load")
    bench.add_argument(
        "kind",
        choices=["e2e", "capture", "restore", "all"],
        help="e2e: the CLI commands with --wait vs the anchors; capture vs redis-cli --rdb, restore vs"
        " start-up load (the components); all: e2e then the components",
    )
    bench.add_argument(
        "--size-mb",
        type=int,
        action="append",
        default=None,
        dest="sizes",
        help="dataset size in MB (repeat for several; default 1024)",
    )
    bench.add_argument(
        "--shape",
        action="append",
        default=None,
        dest="shapes",
        choices=list(SHAPES),
        help="e2e dataset shape (repeat for several; default: all)",
    )
    bench.add_argument("--workdir", type=Path, default=None, help="where datasets and RDBs go (default: a temp dir)")
    add_json_flag(bench)
    bench.set_defaults(func=cmd_bench, operation="Bench")


def cmd_bench(args: argparse.Namespace) -> int:
    from cachevault_tools.bench.report import run_bench  # heavy imports only for this command
    from cachevault_tools.cli import extras

    extras.require("bench", "the benchmark (its plot)")

    sizes = args.sizes or [1024]
    shapes = args.shapes or list(SHAPES)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        # A fresh directory per run: a node restarted on an old dir would reload its old data.
        results = run_bench(
            args.kind, sizes, Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir)), shapes=shapes
        )
    else:
        with tempfile.TemporaryDirectory(prefix="cachevault-bench-") as tmp:
            results = run_bench(args.kind, sizes, Path(tmp), shapes=shapes)
    if args.json:
        emit(args, results)
    return 0
