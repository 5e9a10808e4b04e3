"""CreateSnapshot.SelectSources: re-read the topology and pick each shard's source node."""

from cachevault.core.handler import step_handler
from cachevault.snapshot.steps import select_sources_step

lambda_handler = step_handler(select_sources_step, correlation_id_path="SnapshotName")
