"""CopySnapshot.Preflight: every refusal before anything is written; source marked copying."""

from cachevault.core.handler import step_handler
from cachevault.ops.copy_steps import preflight_step

lambda_handler = step_handler(preflight_step, correlation_id_path="Request.TargetSnapshotName")
