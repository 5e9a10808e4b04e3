"""CopySnapshot.Complete: target manifest and status available; source back to available."""

from cachevault.copy_workflow import complete_step
from cachevault.handler import step_handler

lambda_handler = step_handler(complete_step, correlation_id_path="TargetSnapshotName")
