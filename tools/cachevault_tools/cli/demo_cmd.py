"""cachevault demo: the whole story end to end on the embedded default."""

from __future__ import annotations

import argparse
from typing import Any

from cachevault_tools.cli.output import add_json_flag


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="create, snapshot, restore to another shard count, verify, delete")
    demo.add_argument("--size-mb", type=int, default=32, help="dataset size written to the demo cache")
    demo.add_argument("--keep", action="store_true", help="leave the caches and the embedded AWS running")
    add_json_flag(demo)
    demo.set_defaults(func=cmd_demo, operation="Demo")


def cmd_demo(args: argparse.Namespace) -> int:
    from cachevault_tools.demo import run_demo

    return run_demo(size_mb=args.size_mb, keep=args.keep, as_json=args.json)
