"""RestoreSnapshot.ProvisionCache: start the new cache (seeded from the RDBs when the layout matches)."""

from cachevault.core.handler import step_handler
from cachevault.restore.steps import provision_step

lambda_handler = step_handler(provision_step, correlation_id_path="ReplicationGroupId")
