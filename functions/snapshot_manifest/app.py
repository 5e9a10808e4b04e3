"""CreateSnapshot.WriteManifest: manifest.json next to the RDBs."""

from cachevault.core.handler import step_handler
from cachevault.snapshot.steps import write_manifest_step

lambda_handler = step_handler(write_manifest_step, correlation_id_path="SnapshotName")
