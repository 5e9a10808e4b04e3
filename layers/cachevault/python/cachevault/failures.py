"""Turn a Step Functions Catch payload into the reason a user reads."""

from __future__ import annotations

import contextlib
import json
from typing import Any


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
