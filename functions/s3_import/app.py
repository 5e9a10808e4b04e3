"""S3 import: an RDB uploaded under imports/ starts a restore into a new cache (never waits for it)."""

from cachevault.core.handler import step_handler
from cachevault.ops.imports import s3_import_step

lambda_handler = step_handler(s3_import_step, correlation_id_path="Records[0].s3.object.key")
