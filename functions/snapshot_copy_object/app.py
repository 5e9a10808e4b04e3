"""CopySnapshot.CopyObject: one shard's RDB copied server side (multipart above 512 MiB)."""

from cachevault.copy_workflow import copy_object_step
from cachevault.handler import step_handler

lambda_handler = step_handler(copy_object_step, correlation_id_path="Object.TargetKey")
