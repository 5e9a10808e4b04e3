"""CopySnapshot.MarkFailed: this execution's objects removed, target failed, source available."""

from cachevault.copy_workflow import mark_failed_step
from cachevault.handler import step_handler

lambda_handler = step_handler(mark_failed_step, correlation_id_path="State.TargetSnapshotName")
