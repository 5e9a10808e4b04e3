"""cachevault recover: end operations whose execution is gone (StopExecution, a timeout, a restart)."""

from __future__ import annotations

import argparse
from typing import Any

from cachevault_tools.cli import context
from cachevault_tools.cli.output import add_json_flag, emit


def register(sub: Any) -> None:
    recover = sub.add_parser(
        "recover",
        help="end snapshots, restores and copies whose execution is no longer running (after StopExecution, "
        "a timeout, or a restart of the embedded AWS); running ones are left alone",
    )
    add_json_flag(recover)
    recover.set_defaults(func=cmd_recover, operation="RecoverInterruptedOperations")


def cmd_recover(args: argparse.Namespace) -> int:
    from cachevault.core.handler import logger
    from cachevault.ops.recovery import recover_interrupted

    control = context.control_plane()
    level = logger.log_level
    logger.setLevel("CRITICAL")  # the failure steps log for Lambda (stdout); this command reports itself
    try:
        report = recover_interrupted(control)
    finally:
        logger.setLevel(level)
    emit(args, report, human_report(report))
    return 1 if report.get("Errors") else 0


def human_report(report: dict[str, Any]) -> str:
    lines = []
    for op in report["RecoveredOperations"]:
        subject = op.get("SnapshotName") or op.get("SourceSnapshotName") or ""
        if op.get("ReplicationGroupId"):
            subject = f"{subject} ({op['ReplicationGroupId']})" if subject else op["ReplicationGroupId"]
        line = f"{op['Operation']} {subject}: {op['Status']}"
        if op.get("FailureReason"):
            line += f" - {op['FailureReason']}"
        lines.append(line)
        lines += [f"  cleanup failed: {e}" for e in op.get("CleanupErrors", [])]
    for op in report["RunningOperations"]:
        subject = op.get("SnapshotName") or op.get("SourceSnapshotName") or op.get("ReplicationGroupId")
        lines.append(f"{op['Operation']} {subject}: still running ({op['ExecutionName']}), left alone")
    lines += [f"removed leftover: {item}" for item in report["LeftoversRemoved"]]
    lines += [f"error: {e}" for e in report.get("Errors", [])]
    return "\n".join(lines) or "nothing to recover"
