"""RestoreSnapshot.MarkAvailable: the new cache is available; the snapshot is released."""

from cachevault.core.handler import step_handler
from cachevault.restore.steps import complete_step

lambda_handler = step_handler(complete_step, correlation_id_path="ReplicationGroupId")
