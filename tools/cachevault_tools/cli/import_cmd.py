"""cachevault import list|describe: RDBs uploaded under imports/ and the restores they started."""

from __future__ import annotations

import argparse
from typing import Any

from cachevault_tools.cli import context
from cachevault_tools.cli.output import add_json_flag, emit, human_bytes, table


def register(sub: Any) -> None:
    group = sub.add_parser("import", help="S3 imports: RDBs uploaded under imports/ become caches")
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")

    lst = verbs.add_parser("list", help="every import, newest first, with its outcome")
    add_json_flag(lst)
    lst.set_defaults(func=cmd_list, operation="DescribeImports")

    describe = verbs.add_parser("describe", help="one import by ImportId, object key or cache name")
    describe.add_argument("ref", metavar="REF", help="ImportId, the object's key, or the cache's name")
    add_json_flag(describe)
    describe.set_defaults(func=cmd_describe, operation="DescribeImports")


def cmd_list(args: argparse.Namespace) -> int:
    from cachevault.ops import imports

    control = context.control_plane()
    items = imports.list_imports(control.settings, sfn=control.sfn)
    rows = [{**i, "Size": human_bytes(int(i.get("Size") or 0))} for i in items]
    human = table(rows, ["ImportId", "Key", "CacheName", "Status", "Size", "ImportTime"])
    # Why an import failed, under the table (a reason is too long for a column).
    reasons = [f"{i['ImportId']} failed: {i['FailureReason']}" for i in items if i.get("FailureReason")]
    emit(args, {"Imports": items}, "\n".join([human, *reasons]))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from cachevault.ops import imports

    control = context.control_plane()
    item = imports.describe_import(args.ref, control.settings, sfn=control.sfn)
    human = f"{item['Key']} -> {item.get('CacheName', '?')}: {item['Status']}"
    if item.get("FailureReason"):
        human += f"\n  failed: {item['FailureReason']}"
    emit(args, {"Import": item}, human)
    return 0
