"""CreateSnapshot.StartCapture: start one shard's replication capture into S3."""

from cachevault.core.handler import step_handler
from cachevault.snapshot.steps import start_capture_step

lambda_handler = step_handler(start_capture_step, correlation_id_path="SnapshotName")
