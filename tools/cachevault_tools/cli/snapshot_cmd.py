"""cachevault snapshot create|list|describe|delete|copy (ElastiCache's snapshot API)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cachevault.ops import control_plane as service

from cachevault_tools.cli import context, shapes
from cachevault_tools.cli.output import add_json_flag, emit, human_bytes, name_argument, pick_name, table
from cachevault_tools.cli.progress import ProgressView, capture_parts, copy_parts, describe_part, expected_capture_sizes


def register(sub: Any) -> None:
    snapshot = sub.add_parser("snapshot", help="create, list, describe, copy and delete snapshots")
    verbs = snapshot.add_subparsers(dest="verb", required=True, metavar="VERB")

    create = verbs.add_parser(
        "create",
        help="snapshot a cache (from a replica), streamed to S3",
        description="cachevault snapshot create CACHE SNAPSHOT [--wait]\n"
        "cachevault snapshot create --replication-group-id CACHE --snapshot-name SNAPSHOT [--wait]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    name_argument(create, "cache", "--replication-group-id", "the cache to snapshot")
    name_argument(create, "snapshot", "--snapshot-name", "the new snapshot's name")
    create.add_argument("--source-node", default=None, help="CacheNodeId or host:port (cluster mode disabled only)")
    create.add_argument("--wait", action="store_true", help="wait until available, showing progress")
    add_wait_timeout_flag(create)
    add_json_flag(create)
    create.set_defaults(func=cmd_create, operation="CreateSnapshot")

    lst = verbs.add_parser("list", help="snapshots, newest first per cache")
    lst.add_argument(
        "--cache", "--replication-group-id", dest="cache", default=None, help="only this cache's snapshots"
    )
    lst.add_argument(
        "--source",
        "--snapshot-source",
        dest="source",
        choices=["manual", "automated"],
        default=None,
        help="only manual or only automated snapshots",
    )
    lst.add_argument("--max-records", type=int, default=50, help="page size (20-100)")
    lst.add_argument("--marker", default=None, help="the Marker of the previous page")
    add_json_flag(lst)
    lst.set_defaults(func=cmd_list, operation="DescribeSnapshots")

    describe = verbs.add_parser("describe", help="one snapshot; shows capture progress while creating")
    name_argument(describe, "snapshot", "--snapshot-name", "the snapshot")
    add_json_flag(describe)
    describe.set_defaults(func=cmd_describe, operation="DescribeSnapshots")

    delete = verbs.add_parser("delete", help="delete a snapshot and its S3 objects")
    name_argument(delete, "snapshot", "--snapshot-name", "the snapshot")
    add_json_flag(delete)
    delete.set_defaults(func=cmd_delete, operation="DeleteSnapshot")

    copy = verbs.add_parser(
        "copy",
        help="copy a snapshot in the catalog, or export its RDBs to your S3 bucket",
        description="cachevault snapshot copy SOURCE TARGET [--target-bucket BUCKET] [--wait]\n"
        "cachevault snapshot copy --source-snapshot-name SOURCE --target-snapshot-name TARGET ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    name_argument(copy, "source", "--source-snapshot-name", "the snapshot to copy")
    name_argument(
        copy, "target", "--target-snapshot-name", "the copy's name (an export's objects: TARGET-0001.rdb ...)"
    )
    copy.add_argument("--target-bucket", default=None, help="export to this S3 bucket instead of the catalog")
    copy.add_argument(
        "--wait", action="store_true", help="wait until the copy or export has finished, showing progress"
    )
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


def waiting_note(text: str) -> Any:
    """An ``on_tick`` that says once, on stderr, what the CLI is waiting for."""
    said = False

    def tick() -> None:
        nonlocal said
        if not said:
            print(text, file=sys.stderr, flush=True)
            said = True

    return tick


def not_yet_accepted(operation: str, name: str, follow: str) -> str:
    return (
        f"{name}: requested; its preflight has not run yet (another operation is in progress). "
        f"The {operation} continues and may still be refused; follow it with: {follow}"
    )


def progress_text(record: dict[str, Any]) -> str:
    """One line: status, shards done, bytes so far (or the size once done) and rate."""
    parts = capture_parts(record)
    done = sum(1 for p in parts if p.status == "done")
    head = f"{record['SnapshotName']}: {record['SnapshotStatus']}  shards {done}/{len(parts) or '?'}"
    return "\n".join([head, *("  " + describe_part(p) for p in parts)])


def wait_with_progress(control: Any, record: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
    """Until the execution behind ``record`` ends (or ``timeout_s``), showing the capture's progress."""
    view = ProgressView(record["SnapshotName"])
    expected = expected_capture_sizes(control.catalog, record)
    try:
        return control.wait_snapshot(
            record["SnapshotName"],
            timeout_s=timeout_s,
            execution_arn=record.get("ExecutionArn"),
            progress=lambda r: view.show(r["SnapshotStatus"], capture_parts(r, expected)),
        )
    finally:
        view.close()


class _Shaper:
    """Records -> ElastiCache shapes, reading each cache's backup settings once."""

    def __init__(self, control: Any) -> None:
        self.control = control
        self.arn = shapes.ArnBuilder(control.stack)
        self._caches: dict[str, dict[str, Any]] = {}

    def snapshot(self, record: dict[str, Any]) -> dict[str, Any]:
        cache = record.get("ReplicationGroupId") or ""
        if cache not in self._caches:
            self._caches[cache] = (self.control.catalog.find_cache(cache) if cache else None) or {}
        return shapes.snapshot(record, self.arn, self._caches[cache])


def cmd_create(args: argparse.Namespace) -> int:
    cache, name = pick_name(args, "cache", "--replication-group-id"), pick_name(args, "snapshot", "--snapshot-name")
    control = context.control_plane()
    try:
        record = control.create_snapshot(
            cache,
            name,
            source_node=args.source_node,
            accept_timeout_s=accept_timeout(args),
            on_tick=waiting_note(f"{name.lower()}: waiting for its preflight to run"),
        )
    except service.StillRunning as err:
        return context.gave_up_waiting(err, "CreateSnapshot", f"cachevault snapshot describe {name.lower()}")
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
        arn = record.get("ExecutionArn")
        try:
            record = wait_with_progress(control, record, args.wait_timeout)
        except service.StillRunning as err:
            return context.gave_up_waiting(err, "CreateSnapshot", follow)
        record.setdefault("ExecutionArn", arn)
    emit(args, {"Snapshot": _Shaper(control).snapshot(record)}, _summary(record))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    control = context.control_plane()
    page = control.list_snapshots(
        cache=args.cache, source=args.source, max_records=args.max_records, marker=args.marker
    )
    rows = [
        {**s, "Size": human_bytes(shapes.snapshot_bytes(s)), "Shards": len(s.get("NodeSnapshots", []))}
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
    shaper = _Shaper(control)
    payload: dict[str, Any] = {"Snapshots": [shaper.snapshot(s) for s in page["Snapshots"]]}
    if page.get("Marker"):
        payload["Marker"] = page["Marker"]
    emit(args, payload, human)
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    control = context.control_plane()
    record = control.describe_snapshot(pick_name(args, "snapshot", "--snapshot-name"))
    emit(args, {"Snapshots": [_Shaper(control).snapshot(record)]}, _summary(record))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    control = context.control_plane()
    record = control.delete_snapshot(pick_name(args, "snapshot", "--snapshot-name"))
    emit(args, {"Snapshot": _Shaper(control).snapshot(record)}, f"deleted {record['SnapshotName']}")
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    source = pick_name(args, "source", "--source-snapshot-name")
    target = pick_name(args, "target", "--target-snapshot-name")
    control = context.control_plane()
    follow = f"cachevault snapshot describe {source.lower()}"
    view = ProgressView(f"copy {source} -> {target}") if args.wait else None
    try:
        result = control.copy_snapshot(
            source,
            target,
            args.target_bucket,
            wait=args.wait,
            timeout_s=args.wait_timeout,
            accept_timeout_s=accept_timeout(args),
            progress=(lambda r: view.show("copying", copy_parts(r))) if view else None,
        )
    except service.StillRunning as err:
        return context.gave_up_waiting(err, "CopySnapshot", follow)
    finally:
        if view:
            view.close()
    if result.get("Accepted") is False:
        emit(args, result, not_yet_accepted("copy", result["TargetSnapshotName"], follow))
        return 0
    if result["Mode"] == "export":
        where = f"s3://{result['TargetBucket']}/"
        objects = [o["Key"] for o in result.get("Objects", [])] or [f"{result['TargetSnapshotName']}-*.rdb"]
        human = f"exported {result['SourceSnapshotName']} to " + ", ".join(where + o for o in objects)
        snapshot = control.catalog.get_snapshot(result["SourceSnapshotName"])
    else:
        snapshot = result["Snapshot"]
        human = _summary(snapshot)
    if result.get("SnapshotStatus") == "copying":
        human += f"\n{result['SourceSnapshotName']} is copying; watch it with: cachevault snapshot describe"
    extras = {k: v for k, v in result.items() if k not in ("Snapshot", "CopyProgress")}
    emit(args, {"Snapshot": _Shaper(control).snapshot(snapshot), shapes.EXTRAS: extras}, human)
    return 0


def _summary(record: dict[str, Any]) -> str:
    if record["SnapshotStatus"] == "creating":
        return progress_text(record)
    lines = [
        f"{record['SnapshotName']}: {record['SnapshotStatus']}  {record.get('SnapshotSource')}  "
        f"from {record.get('ReplicationGroupId')}  {human_bytes(shapes.snapshot_bytes(record))}"
    ]
    for node in record.get("NodeSnapshots", []):
        slots = (node.get("NodeGroupConfiguration") or {}).get("Slots")
        size = int(node.get("Size") or node.get("BytesCaptured") or 0)
        seconds = node.get("CaptureSeconds")
        rate = f" in {float(seconds):.1f} s ({human_bytes(size / float(seconds))}/s)" if seconds else ""
        lines.append(
            f"  {node['NodeGroupId']}: {node.get('CacheNodeId')} ({node.get('SourceRole')})"
            + (f" slots {slots}" if slots else "")
            + f"  {human_bytes(size)}{rate}  {node.get('S3Key', '')}"
        )
    for warning in record.get("Warnings") or []:
        lines.append(f"  warning: {warning}")
    if record.get("FailureReason"):
        lines.append(f"  failed: {record['FailureReason']}")
    return "\n".join(lines)
