"""CreateSnapshot.Preflight: ElastiCache constraints, then the record (creating) and the cache lock."""

from cachevault.core.handler import step_handler
from cachevault.snapshot.steps import preflight_step

lambda_handler = step_handler(preflight_step, correlation_id_path="Request.SnapshotName")
