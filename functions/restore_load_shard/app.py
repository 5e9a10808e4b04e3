"""RestoreSnapshot.LoadShard: read one RDB from S3 into the target primaries (RESTORE batches, slot routing)."""

from cachevault.core.handler import step_handler
from cachevault.restore.steps import load_shard_step

lambda_handler = step_handler(load_shard_step, correlation_id_path="ReplicationGroupId")
