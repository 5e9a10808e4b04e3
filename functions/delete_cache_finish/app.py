"""DeleteCache.DeleteCache: the final snapshot is available; stop the nodes, remove the record."""

from cachevault.core.handler import step_handler
from cachevault.ops.delete_steps import delete_cache_step

lambda_handler = step_handler(delete_cache_step, correlation_id_path="ReplicationGroupId")
