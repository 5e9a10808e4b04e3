"""CreateSnapshot.FinishShard: check the shard's object and record its size."""

from cachevault.core.handler import step_handler
from cachevault.snapshot.steps import finish_shard_step

lambda_handler = step_handler(finish_shard_step, correlation_id_path="SnapshotName")
