"""CopySnapshot.Complete: target manifest and status available; source back to available."""

from cachevault.core.handler import step_handler
from cachevault.ops.copy_steps import complete_step

lambda_handler = step_handler(complete_step, correlation_id_path="TargetSnapshotName")
