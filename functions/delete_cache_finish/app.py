"""DeleteCache.DeleteCache: the final snapshot is available; stop the nodes, remove the record."""

from cachevault.delete_workflow import delete_cache_step
from cachevault.handler import step_handler

lambda_handler = step_handler(delete_cache_step, correlation_id_path="ReplicationGroupId")
