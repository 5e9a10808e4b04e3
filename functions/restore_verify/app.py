"""RestoreSnapshot.Verify: key counts per shard and sampled DUMP comparison."""

from cachevault.core.handler import step_handler
from cachevault.restore.steps import verify_step

lambda_handler = step_handler(verify_step, correlation_id_path="ReplicationGroupId")
