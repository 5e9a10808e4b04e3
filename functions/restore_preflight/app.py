"""RestoreSnapshot.Preflight: constraints, target name reserved, sources staged and checked."""

from cachevault.core.handler import step_handler
from cachevault.restore.steps import preflight_step

lambda_handler = step_handler(preflight_step, correlation_id_path="Request.ReplicationGroupId")
