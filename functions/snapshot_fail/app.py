"""CreateSnapshot.MarkFailed: status failed with the reason; partial objects removed; lock released."""

from cachevault.handler import step_handler
from cachevault.snapshot_workflow import mark_failed_step

lambda_handler = step_handler(mark_failed_step, correlation_id_path="State.SnapshotName")
