"""DeleteCache.PollSnapshot: is the final snapshot available yet (its failure fails the delete)."""

from cachevault.delete_workflow import poll_final_snapshot_step
from cachevault.handler import step_handler

lambda_handler = step_handler(poll_final_snapshot_step, correlation_id_path="ReplicationGroupId")
