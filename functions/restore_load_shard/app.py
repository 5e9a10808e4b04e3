"""RestoreSnapshot.LoadShard: read one RDB from S3 into the target primaries (RESTORE batches, slot routing)."""

from cachevault.handler import step_handler
from cachevault.restore_workflow import load_shard_step

lambda_handler = step_handler(load_shard_step, correlation_id_path="ReplicationGroupId")
