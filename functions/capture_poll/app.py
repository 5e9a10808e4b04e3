"""CreateSnapshot.PollCapture: progress of one shard's capture; fails when the capture failed."""

from cachevault.core.handler import step_handler
from cachevault.snapshot.steps import poll_capture_step

lambda_handler = step_handler(poll_capture_step, correlation_id_path="SnapshotName")
