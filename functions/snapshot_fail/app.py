"""CreateSnapshot.MarkFailed: status failed with the reason; partial objects removed; lock released."""

from cachevault.core.handler import step_handler
from cachevault.snapshot.steps import mark_failed_step

lambda_handler = step_handler(mark_failed_step, correlation_id_path="State.SnapshotName")
