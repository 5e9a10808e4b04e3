"""RestoreSnapshot.MarkFailed: stop what was started, mark the cache failed, release the snapshot."""

from cachevault.core.handler import step_handler
from cachevault.restore.steps import fail_step

lambda_handler = step_handler(fail_step, correlation_id_path="State.ReplicationGroupId")
