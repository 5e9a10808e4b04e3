"""CreateSnapshot.Preflight: ElastiCache constraints, then the record (creating) and the cache lock."""

from cachevault.handler import step_handler
from cachevault.snapshot_workflow import preflight_step

lambda_handler = step_handler(preflight_step, correlation_id_path="Request.SnapshotName")
