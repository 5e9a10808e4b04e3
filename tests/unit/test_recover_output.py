"""``cachevault recover``'s text output and the execution ARN the recovery asks about."""

from __future__ import annotations

from cachevault.ops.recovery import execution_arn, interrupted_reason
from cachevault_tools.cli.recover_cmd import human_report


def test_execution_arn_is_derived_from_its_state_machine() -> None:
    machine = "arn:aws:states:eu-west-1:111122223333:stateMachine:cachevault-CreateSnapshot"
    assert execution_arn(machine, "snapshot-a-1234abcd") == (
        "arn:aws:states:eu-west-1:111122223333:execution:cachevault-CreateSnapshot:snapshot-a-1234abcd"
    )


def test_reasons_say_what_happened_to_the_execution() -> None:
    assert interrupted_reason("x", "ABORTED") == "execution x ABORTED before it finished"
    assert interrupted_reason("x", "TIMED_OUT") == "execution x TIMED_OUT before it finished"
    assert "no longer exists" in interrupted_reason("x", "GONE")
    assert interrupted_reason("x", "FAILED") == "execution x FAILED without finishing the operation"


def test_human_report_names_each_operation_and_what_was_left_alone() -> None:
    report = {
        "RecoveredOperations": [
            {"Operation": "CreateSnapshot", "SnapshotName": "s", "ReplicationGroupId": "c", "Status": "failed",
             "FailureReason": "Interrupted: execution e ABORTED before it finished", "CleanupErrors": ["x: boom"]},
            {"Operation": "RestoreSnapshot", "ReplicationGroupId": "t", "Status": "failed", "FailureReason": "r"},
        ],
        "RunningOperations": [{"Operation": "CopySnapshot", "SourceSnapshotName": "src", "ExecutionName": "copy-1"}],
        "LeftoversRemoved": ["progress restore#t"],
    }  # fmt: skip
    assert human_report(report).splitlines() == [
        "CreateSnapshot s (c): failed - Interrupted: execution e ABORTED before it finished",
        "  cleanup failed: x: boom",
        "RestoreSnapshot t: failed - r",
        "CopySnapshot src: still running (copy-1), left alone",
        "removed leftover: progress restore#t",
    ]
    assert human_report({"RecoveredOperations": [], "RunningOperations": [], "LeftoversRemoved": []}) == (
        "nothing to recover"
    )
