"""How commands print: JSON with ``--json``, otherwise short human text; progress on stderr."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cachevault.core.errors import CacheVaultError, InvalidParameterCombination

from cachevault_tools.cli.units import iec_bytes


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


def human_bytes(n: float) -> str:
    """IEC units (KiB, MiB, GiB): the one unit system of human output."""
    return iec_bytes(n)


def name_argument(parser: argparse.ArgumentParser, dest: str, flag: str, help_text: str) -> None:
    """A name given positionally (``NAME``) or with the AWS CLI's flag (``--snapshot-name NAME``)."""
    parser.add_argument(dest, nargs="?", default=None, metavar=dest.upper(), help=f"{help_text} (or {flag})")
    parser.add_argument(flag, dest=f"{dest}_flag", default=None, metavar=dest.upper(), help=f"same as {dest.upper()}")


def pick_name(args: argparse.Namespace, dest: str, flag: str) -> str:
    positional, flagged = getattr(args, dest), getattr(args, f"{dest}_flag")
    if positional and flagged and positional != flagged:
        raise InvalidParameterCombination(f"{dest.upper()} {positional!r} and {flag} {flagged!r} differ: give one.")
    value = positional or flagged
    if not value:
        raise InvalidParameterCombination(f"give {dest.upper()} (or {flag} {dest.upper()}).")
    return value
