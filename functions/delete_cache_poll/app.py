"""DeleteCache.PollSnapshot: is the final snapshot available yet (its failure fails the delete)."""

from cachevault.core.handler import step_handler
from cachevault.ops.delete_steps import poll_final_snapshot_step

lambda_handler = step_handler(poll_final_snapshot_step, correlation_id_path="ReplicationGroupId")
