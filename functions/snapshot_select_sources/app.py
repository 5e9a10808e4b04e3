"""CreateSnapshot.SelectSources: re-read the topology and pick each shard's source node."""

from cachevault.handler import step_handler
from cachevault.snapshot_workflow import select_sources_step

lambda_handler = step_handler(select_sources_step, correlation_id_path="SnapshotName")
