"""DeleteCache.StartFinalSnapshot: check the request, start CreateSnapshot from the primaries."""

from cachevault.delete_workflow import start_final_snapshot_step
from cachevault.handler import step_handler

lambda_handler = step_handler(start_final_snapshot_step, correlation_id_path="ReplicationGroupId")
