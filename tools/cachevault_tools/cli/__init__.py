"""``cachevault``: the command line. Every command has ``--help`` and ``--json``.

Errors print like the AWS CLI's (``An error occurred (Code) when calling the X
operation: message``) so scripts written against ElastiCache read them the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cachevault.core.errors import CacheVaultError

from cachevault_tools.cli import (
    bench_cmd,
    cache_cmd,
    catalog_cmd,
    context,
    demo_cmd,
    import_cmd,
    local_cmd,
    recover_cmd,
    restore_cmd,
    snapshot_cmd,
)
from cachevault_tools.cli.output import fail

# Each module adds its subcommands; adding a command group is one line here.
COMMAND_GROUPS = (
    local_cmd, cache_cmd, snapshot_cmd, restore_cmd, import_cmd, catalog_cmd, recover_cmd, bench_cmd, demo_cmd
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachevault",
        description="ElastiCache-grade snapshot and restore for self-managed Redis OSS and Valkey.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CacheVaultError as err:
        return fail(args, err)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unreachable endpoint, a botocore error, a bug: one line, exit 254
        if os.environ.get("CACHEVAULT_DEBUG"):
            raise
        return fail(args, context.service_error(exc))


if __name__ == "__main__":
    raise SystemExit(main())
