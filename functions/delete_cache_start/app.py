"""DeleteCache.StartFinalSnapshot: check the request, start CreateSnapshot from the primaries."""

from cachevault.core.handler import step_handler
from cachevault.ops.delete_steps import start_final_snapshot_step

lambda_handler = step_handler(start_final_snapshot_step, correlation_id_path="ReplicationGroupId")
