"""HTTP API: snapshot create/list/describe/delete/copy and restore (API Gateway REST proxy)."""

from cachevault.ops.api import lambda_handler

__all__ = ["lambda_handler"]
