"""How commands print: JSON with ``--json``, otherwise short human text; progress on stderr."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from cachevault.errors import CacheVaultError


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON (ElastiCache field names)")


def emit(args: argparse.Namespace, payload: Any, human: str | None = None) -> None:
    if getattr(args, "json", False) or human is None:
        print(json.dumps(payload, indent=2, default=str, sort_keys=False))
    else:
        print(human)


def fail(args: argparse.Namespace, err: CacheVaultError) -> int:
    operation = getattr(args, "operation", None) or "cachevault"
    if getattr(args, "json", False):
        print(json.dumps({"Error": err.to_dict()}, indent=2, default=str))
    print(f"An error occurred ({err.code}) when calling the {operation} operation: {err.message}", file=sys.stderr)
    return 254  # the AWS CLI's exit code for a service error


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


class ProgressLine:
    """One updating line on a terminal; periodic plain lines otherwise (CI logs)."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.tty = sys.stderr.isatty()
        self.every_s = every_s
        self._last = 0.0
        self._text = ""

    def update(self, text: str) -> None:
        if text == self._text:
            return
        now = time.monotonic()
        if self.tty:
            sys.stderr.write("\r\033[K" + text)
            sys.stderr.flush()
        elif now - self._last >= self.every_s:
            print(text, file=sys.stderr, flush=True)
            self._last = now
        self._text = text

    def done(self) -> None:
        if self.tty and self._text:
            sys.stderr.write("\n")
            sys.stderr.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"
