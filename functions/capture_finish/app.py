"""CreateSnapshot.FinishShard: check the shard's object and record its size."""

from cachevault.handler import step_handler
from cachevault.snapshot_workflow import finish_shard_step

lambda_handler = step_handler(finish_shard_step, correlation_id_path="SnapshotName")
