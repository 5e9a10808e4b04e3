"""RestoreSnapshot.AttachReplicas: replicas added to the empty primaries before the load, waited on until linked."""

from cachevault.core.handler import step_handler
from cachevault.restore.steps import attach_replicas_step

lambda_handler = step_handler(attach_replicas_step, correlation_id_path="ReplicationGroupId")
