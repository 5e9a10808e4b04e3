"""cachevault snapshot create|list|describe|delete|copy (ElastiCache's snapshot API)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cachevault import service
from cachevault.cli import context
from cachevault.cli.output import ProgressLine, add_json_flag, emit, human_bytes, table


def register(sub: Any) -> None:
    snapshot = sub.add_parser("snapshot", help="create, list, describe and delete snapshots")
    verbs = snapshot.add_subparsers(dest="verb", required=True, metavar="VERB")

    create = verbs.add_parser("create", help="snapshot a cache (from a replica), streamed to S3")
    create.add_argument("cache", help="ReplicationGroupId")
    create.add_argument("name", help="SnapshotName")
    create.add_argument("--source-node", default=None, help="CacheNodeId or host:port (cluster mode disabled only)")
    create.add_argument("--wait", action="store_true", help="wait until available, showing progress")
    add_wait_timeout_flag(create)
    add_json_flag(create)
    create.set_defaults(func=cmd_create, operation="CreateSnapshot")

    lst = verbs.add_parser("list", help="snapshots, newest first per cache")
    lst.add_argument("--cache", default=None, help="only this ReplicationGroupId")
    lst.add_argument("--source", choices=["manual", "automated"], default=None, help="SnapshotSource")
    lst.add_argument("--max-records", type=int, default=50, help="page size (20-100)")
    lst.add_argument("--marker", default=None, help="the Marker of the previous page")
    add_json_flag(lst)
    lst.set_defaults(func=cmd_list, operation="DescribeSnapshots")

    describe = verbs.add_parser("describe", help="one snapshot; shows capture progress while creating")
    describe.add_argument("name")
    add_json_flag(describe)
    describe.set_defaults(func=cmd_describe, operation="DescribeSnapshots")

    delete = verbs.add_parser("delete", help="delete a snapshot and its S3 objects")
    delete.add_argument("name")
    add_json_flag(delete)
    delete.set_defaults(func=cmd_delete, operation="DeleteSnapshot")

    copy = verbs.add_parser("copy", help="copy a snapshot in the catalog, or export its RDBs to your S3 bucket")
    copy.add_argument("source", help="SourceSnapshotName")
    copy.add_argument("target", help="TargetSnapshotName (the export's object names: TARGET-0001.rdb ...)")
    copy.add_argument("--target-bucket", default=None, help="export to this S3 bucket instead of the catalog")
    copy.add_argument("--wait", action="store_true", help="wait until the copy or export has finished")
    add_wait_timeout_flag(copy)
    add_json_flag(copy)
    copy.set_defaults(func=cmd_copy, operation="CopySnapshot")


def add_wait_timeout_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --wait: stop waiting after this long (the operation continues); default: until it ends",
    )


def accept_timeout(args: argparse.Namespace) -> float | None:
    """Without --wait, how long to wait for the preflight; with it, as long as the wait."""
    return args.wait_timeout if args.wait else service.ACCEPT_TIMEOUT_S


def not_yet_accepted(operation: str, name: str, follow: str) -> str:
    return (
        f"{name}: requested; its preflight has not run yet (another operation is in progress). "
        f"The {operation} continues and may still be refused; follow it with: {follow}"
    )


def progress_text(record: dict[str, Any]) -> str:
    nodes = record.get("NodeSnapshots", [])
    done = sum(1 for n in nodes if n.get("CaptureStatus") == "done")
    captured = sum(int(n.get("BytesCaptured", 0)) for n in nodes)
    rate = sum(int(n.get("RateBytesPerSecond", 0)) for n in nodes if n.get("CaptureStatus") == "running")
    return (
        f"{record['SnapshotName']}: {record['SnapshotStatus']}  shards {done}/{len(nodes) or '?'}  "
        f"{human_bytes(captured)} captured  {human_bytes(rate)}/s"
    )


def wait_with_progress(control: Any, record: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
    """Until the execution behind ``record`` ends (or ``timeout_s``), showing the capture's progress."""
    line = ProgressLine()
    try:
        return control.wait_snapshot(
            record["SnapshotName"],
            timeout_s=timeout_s,
            execution_arn=record.get("ExecutionArn"),
            progress=lambda r: line.update(progress_text(r)),
        )
    finally:
        line.done()


def cmd_create(args: argparse.Namespace) -> int:
    control = context.control_plane()
    line = ProgressLine()
    try:
        record = control.create_snapshot(
            args.cache,
            args.name,
            source_node=args.source_node,
            accept_timeout_s=accept_timeout(args),
            on_tick=lambda: line.update(f"{args.name.lower()}: waiting for its preflight to run"),
        )
    except service.StillRunning as err:
        return context.gave_up_waiting(err, "CreateSnapshot", f"cachevault snapshot describe {args.name.lower()}")
    finally:
        line.done()
    follow = f"cachevault snapshot describe {record['SnapshotName']}"
    if record.get("Accepted") is False:
        if args.wait:  # accept_timeout was the --wait-timeout
            err = service.StillRunning("not accepted yet", execution_arn=record["ExecutionArn"])
            return context.gave_up_waiting(err, "CreateSnapshot", follow)
        emit(args, {"Snapshot": record}, not_yet_accepted("snapshot", record["SnapshotName"], follow))
        return 0
    for warning in record.get("Warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    if args.wait:
        try:
            record = wait_with_progress(control, record, args.wait_timeout)
        except service.StillRunning as err:
            return context.gave_up_waiting(err, "CreateSnapshot", follow)
    emit(args, {"Snapshot": record}, _summary(record))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    control = context.control_plane()
    page = control.list_snapshots(
        cache=args.cache, source=args.source, max_records=args.max_records, marker=args.marker
    )
    rows = [
        {**s, "Size": human_bytes(int(s.get("CacheSize") or 0)), "Shards": len(s.get("NodeSnapshots", []))}
        for s in page["Snapshots"]
    ]
    human = table(
        rows,
        [
            "SnapshotName",
            "ReplicationGroupId",
            "SnapshotStatus",
            "SnapshotSource",
            "Shards",
            "Size",
            "SnapshotCreateTime",
        ],
    )
    if page.get("Marker"):
        human += f"\nmore: --marker {page['Marker']}"
    emit(args, page, human)
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    control = context.control_plane()
    record = control.describe_snapshot(args.name)
    emit(args, {"Snapshot": record}, _summary(record))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    control = context.control_plane()
    record = control.delete_snapshot(args.name)
    emit(args, {"Snapshot": record}, f"deleted {record['SnapshotName']}")
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    control = context.control_plane()
    follow = f"cachevault snapshot describe {args.source.lower()}"
    try:
        result = control.copy_snapshot(
            args.source,
            args.target,
            args.target_bucket,
            wait=args.wait,
            timeout_s=args.wait_timeout,
            accept_timeout_s=accept_timeout(args),
        )
    except service.StillRunning as err:
        return context.gave_up_waiting(err, "CopySnapshot", follow)
    if result.get("Accepted") is False:
        emit(args, result, not_yet_accepted("copy", result["TargetSnapshotName"], follow))
        return 0
    if result["Mode"] == "export":
        where = f"s3://{result['TargetBucket']}/"
        objects = [o["Key"] for o in result.get("Objects", [])] or [f"{result['TargetSnapshotName']}-*.rdb"]
        human = f"exported {result['SourceSnapshotName']} to " + ", ".join(where + o for o in objects)
    else:
        human = _summary(result["Snapshot"])
    if result.get("SnapshotStatus") == "copying":
        human += f"\n{result['SourceSnapshotName']} is copying; watch it with: cachevault snapshot describe"
    emit(args, result, human)
    return 0


def _summary(record: dict[str, Any]) -> str:
    lines = [
        progress_text(record)
        if record["SnapshotStatus"] == "creating"
        else f"{record['SnapshotName']}: {record['SnapshotStatus']}  {record.get('SnapshotSource')}  "
        f"from {record.get('ReplicationGroupId')}  {human_bytes(int(record.get('CacheSize') or 0))}"
    ]
    for node in record.get("NodeSnapshots", []):
        slots = (node.get("NodeGroupConfiguration") or {}).get("Slots")
        lines.append(
            f"  {node['NodeGroupId']}: {node.get('CacheNodeId')} ({node.get('SourceRole')})"
            + (f" slots {slots}" if slots else "")
            + f"  {human_bytes(int(node.get('Size') or node.get('BytesCaptured') or 0))}  {node.get('S3Key', '')}"
        )
    for warning in record.get("Warnings") or []:
        lines.append(f"  warning: {warning}")
    if record.get("FailureReason"):
        lines.append(f"  failed: {record['FailureReason']}")
    return "\n".join(lines)
