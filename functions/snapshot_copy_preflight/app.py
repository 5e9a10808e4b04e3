"""CopySnapshot.Preflight: every refusal before anything is written; source marked copying."""

from cachevault.copy_workflow import preflight_step
from cachevault.handler import step_handler

lambda_handler = step_handler(preflight_step, correlation_id_path="Request.TargetSnapshotName")
