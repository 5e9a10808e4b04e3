"""RestoreSnapshot.LoadResult: the output of a LoadShard that ran as an ECS worker task, read from S3."""

from cachevault.core.handler import step_handler
from cachevault.restore.steps import load_result_step

lambda_handler = step_handler(load_result_step, correlation_id_path="ReplicationGroupId")
