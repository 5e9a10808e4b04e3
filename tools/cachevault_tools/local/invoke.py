"""``cachevault local invoke``: run one deployed function with an event, like ``sam local invoke``.

The function runs inside the embedded AWS through Lambda's own ``Invoke`` API, so it gets
exactly what the state machines give it: the template's environment (Globals + its
own), a Lambda context, the real handler under ``functions/``. A function is named by
its logical id (``SnapshotPreflightFunction``), its ``functions/`` directory
(``snapshot_preflight``) or its deployed name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.config import Config
from cachevault.core.aws import session
from cachevault.core.errors import InvalidParameterValue

SERVERLESS_FUNCTION = "AWS::Serverless::Function"


@dataclass(frozen=True)
class Invocation:
    function_name: str
    payload: Any  # the handler's JSON result, or Lambda's error JSON
    function_error: str | None  # "Unhandled" when the handler raised

    @property
    def error_type(self) -> str | None:
        if not self.function_error or not isinstance(self.payload, dict):
            return None
        return self.payload.get("errorType")


def template_functions(template: Path) -> dict[str, str]:
    """Logical id -> ``functions/`` directory name, for every function in the template."""
    from cachevault_tools.local.cfn_intrinsics import load_template

    resources = load_template(template).get("Resources") or {}
    found = {}
    for lid, res in resources.items():
        if res.get("Type") != SERVERLESS_FUNCTION:
            continue
        code = (res.get("Properties") or {}).get("CodeUri")
        if isinstance(code, str):
            found[lid] = Path(code.rstrip("/")).name
    return found


def resolve_function(wanted: str, deployed: dict[str, str], template: Path) -> str:
    """The deployed name of ``wanted`` (logical id, functions/ dir name, or deployed name)."""
    if wanted in deployed:
        return deployed[wanted]
    if wanted in deployed.values():
        return wanted
    by_dir = {d: lid for lid, d in template_functions(template).items()}
    lid = by_dir.get(wanted.removeprefix("functions/").rstrip("/"))
    if lid and lid in deployed:
        return deployed[lid]
    known = ", ".join(sorted(by_dir))
    raise InvalidParameterValue(f"No function {wanted!r} in the deployed stack; known: {known}.")


def load_event(path: Path | None) -> Any:
    if path is None:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidParameterValue(f"Cannot read the event {path}: {exc}") from exc


def invoke(function_name: str, event: Any) -> Invocation:
    """Invoke synchronously (RequestResponse) through the Lambda API of the current endpoint."""
    # One attempt (an invocation is not idempotent) and Lambda's longest run as read timeout.
    lam = session().client("lambda", config=Config(read_timeout=910, retries={"total_max_attempts": 1}))
    response = lam.invoke(
        FunctionName=function_name,
        InvocationType="RequestResponse",
        Payload=json.dumps(event).encode(),
    )
    raw = response["Payload"].read()
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = raw.decode("utf-8", "replace")
    return Invocation(function_name, payload, response.get("FunctionError"))
