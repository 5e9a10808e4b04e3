"""CreateSnapshot.MarkAvailable: status available, lock released."""

from cachevault.core.handler import step_handler
from cachevault.snapshot.steps import mark_available_step

lambda_handler = step_handler(mark_available_step, correlation_id_path="SnapshotName")
