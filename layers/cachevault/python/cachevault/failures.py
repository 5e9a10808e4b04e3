"""Turn a Step Functions Catch payload into the reason a user reads."""

from __future__ import annotations

import contextlib
import json
from typing import Any


def failure_reason(error: dict[str, Any]) -> str:
    """``{"Error": "X", "Cause": "<Lambda error JSON>"}`` -> ``"X: message"``."""
    cause = error.get("Cause", "")
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        cause = json.loads(cause).get("errorMessage", cause)
    kind = error.get("Error", "Error")
    return f"{kind}: {cause}" if cause else kind
