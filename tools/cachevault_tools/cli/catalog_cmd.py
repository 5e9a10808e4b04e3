"""cachevault catalog rebuild: snapshot records made again from the manifests in the snapshot bucket."""

from __future__ import annotations

import argparse
from typing import Any

from cachevault.catalog import rebuild
from cachevault.core.aws import client

from cachevault_tools.cli import context
from cachevault_tools.cli.output import add_json_flag, emit


def register(sub: Any) -> None:
    catalog = sub.add_parser("catalog", help="the snapshot catalog (DynamoDB), an index of the snapshot bucket")
    verbs = catalog.add_subparsers(dest="verb", required=True, metavar="VERB")
    rebuild_parser = verbs.add_parser(
        "rebuild",
        help="re-create the snapshot records missing from the catalog from the manifests in the snapshot bucket",
        description=(
            "Reads snapshots/<name>/manifest.json of every snapshot in the bucket and adds the record of each "
            "one the catalog lacks (status available). Existing records are kept as they are; a manifest that "
            "cannot be read or whose RDB objects are missing is skipped with the reason. Safe to run again."
        ),
    )
    add_json_flag(rebuild_parser)
    rebuild_parser.set_defaults(func=cmd_rebuild, operation="RebuildCatalog")


def cmd_rebuild(args: argparse.Namespace) -> int:
    control = context.control_plane()
    result = rebuild.rebuild(control.catalog, client("s3"), control.settings.bucket)
    lines = [f"snapshot bucket: {result['Bucket']}"]
    lines.append(f"added: {', '.join(result['Added']) or '(none)'}")
    lines.append(f"kept: {', '.join(result['Kept']) or '(none)'}")
    lines += [f"skipped: {s['SnapshotName']}: {s['Reason']}" for s in result["Skipped"]]
    emit(args, result, "\n".join(lines))
    return 0
