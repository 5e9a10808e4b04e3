"""CopySnapshot.MarkFailed: this execution's objects removed, target failed, source available."""

from cachevault.core.handler import step_handler
from cachevault.ops.copy_steps import mark_failed_step

lambda_handler = step_handler(mark_failed_step, correlation_id_path="State.TargetSnapshotName")
