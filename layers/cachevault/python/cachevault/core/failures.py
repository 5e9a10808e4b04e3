"""Turn a Step Functions Catch payload into the reason a user reads."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

from cachevault.core.handler import logger


def caught_failure(event: dict[str, Any]) -> tuple[dict[str, Any], str, dict[str, Any], str]:
    """A failure step's input -> (state, execution name, original request, reason).

    The state machines pass ``{"State": <state with "Error">, "ExecutionName": ...}``; a bare
    state (a direct invoke) is accepted too.
    """
    state = event.get("State", event)
    return state, event.get("ExecutionName", ""), state.get("Request", state), failure_reason(state.get("Error") or {})


def failure_reason(error: dict[str, Any]) -> str:
    """``{"Error": "X", "Cause": "<Lambda error JSON>"}`` -> ``"X: message"``."""
    cause = error.get("Cause", "")
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        cause = json.loads(cause).get("errorMessage", cause)
    kind = error.get("Error", "Error")
    return f"{kind}: {cause}" if cause else kind


# "Already gone" is the goal of a cleanup: S3 objects/uploads/buckets, DynamoDB items,
# catalog records (our faults), Secrets Manager/SSM entries.
_GONE_CODES = frozenset(
    {
        "NoSuchKey",
        "NoSuchBucket",
        "NoSuchUpload",
        "NotFound",
        "404",
        "ResourceNotFoundException",
        "ParameterNotFound",
        "ConditionalCheckFailedException",
        "SnapshotNotFoundFault",
        "ReplicationGroupNotFoundFault",
        "CacheClusterNotFound",
    }
)


def is_gone(exc: BaseException) -> bool:
    """Whether an error only says that the thing a cleanup touches no longer exists."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code")) in _GONE_CODES
    return type(exc).__name__ in _GONE_CODES or getattr(exc, "code", None) in _GONE_CODES


def cleanup(what: str, action: Callable[[], Any], errors: list[str]) -> Any:
    """Run one cleanup of a failure step; "already gone" counts as done.

    Any other error is recorded in ``errors`` (and logged) instead of raised, so one
    failing cleanup never stops the others, and never turns the failure step itself into
    a crash that would hide the original failure.
    """
    try:
        return action()
    except Exception as exc:
        if is_gone(exc):
            logger.info("already gone", cleanup=what, error=str(exc))
            return None
        logger.exception("cleanup failed", cleanup=what)
        errors.append(f"{what}: {type(exc).__name__}: {exc}")
        return None
