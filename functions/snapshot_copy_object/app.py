"""CopySnapshot.CopyObject: one shard's RDB copied server side (multipart above 512 MiB)."""

from cachevault.core.handler import step_handler
from cachevault.ops.copy_steps import copy_object_step

lambda_handler = step_handler(copy_object_step, correlation_id_path="Object.TargetKey")
