"""Documents of one execution that are too big for a state payload, kept in the snapshot bucket.

Step Functions refuses a state input or output over 256 KB (``States.DataLimitExceeded``,
which ``States.ALL`` does not catch), and every Map result is gathered into one state. What
grows with the number of shards (a restore's sources, each load's per-target counts and its
key samples) is written here as JSON under ``executions/<execution name>/`` and the state
carries its key. The steps that end an execution (MarkAvailable, MarkFailed) remove the
prefix; a bucket lifecycle rule expires what an execution that died on its own left behind.
"""

from __future__ import annotations

import json
from typing import Any

from cachevault import encryption, storage
from cachevault.aws import client
from cachevault.settings import Settings

PREFIX = "executions/"


def prefix(execution: str) -> str:
    return f"{PREFIX}{storage.check_snapshot_name(execution)}/"


def key(execution: str, name: str) -> str:
    return storage.check_key(f"{prefix(execution)}{name}.json")


def put(execution: str, name: str, document: Any, settings: Settings | None = None) -> str:
    """Write ``document`` as JSON; returns its key (what the state carries)."""
    settings = settings or Settings.from_env()
    target = key(execution, name)
    body = json.dumps(document, separators=(",", ":")).encode()
    client("s3").put_object(
        Bucket=settings.bucket, Key=target, Body=body, ContentType="application/json", **encryption.s3_args()
    )
    return target


def get(document_key: str, settings: Settings | None = None) -> Any:
    settings = settings or Settings.from_env()
    if not document_key.startswith(PREFIX):
        raise ValueError(f"{document_key!r} is not an execution document")
    body = client("s3").get_object(Bucket=settings.bucket, Key=storage.check_key(document_key))["Body"]
    return json.loads(body.read())


def delete_all(execution: str, settings: Settings | None = None) -> int:
    """Remove every document of ``execution`` (none is fine); returns how many."""
    if not execution:
        return 0
    settings = settings or Settings.from_env()
    return storage.delete_prefix(client("s3"), settings.bucket, prefix(execution))
