"""RestoreSnapshot.Preflight: constraints, target name reserved, sources staged and checked."""

from cachevault.handler import step_handler
from cachevault.restore_workflow import preflight_step

lambda_handler = step_handler(preflight_step, correlation_id_path="Request.ReplicationGroupId")
