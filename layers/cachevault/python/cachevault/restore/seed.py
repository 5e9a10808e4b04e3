"""A new node's RDB, written from S3 before its server starts: the node task's ``seed`` container.

The node task definitions (template.yaml) run ``python -m cachevault.worker seed`` as a
non-essential container the server's container depends on (``dependsOn`` SUCCESS), both
mounting the task's ``data`` volume at ``/data``, where the official images' server keeps
``dump.rdb``. ProvisionCache passes the shard's source in ``SEED_SOURCE`` (bucket, key,
version, SHA-256, size); a node started with no source (``cache create``, a resharded
restore) starts empty.

The object is read with ranged GETs, its SHA-256 checked on the fly
(``storage.S3RangeReader``), and written to ``dump.rdb.part``; only a whole, checked object
is renamed to ``dump.rdb``, which the server loads at start-up (checking the RDB's own
CRC64 as it goes). A short read or a wrong digest leaves no ``dump.rdb`` and exits non-zero,
so the server never starts on bad data: the task stops, and DescribeTasks says why.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

from cachevault.core.errors import InvalidParameterValue

SEED_SOURCE_ENV = "SEED_SOURCE"
SEED_PATH_ENV = "SEED_PATH"
SEED_TARGET_ENV = "SEED_TARGET"  # the cache (progress is reported under its name)
SEED_NODE_ENV = "SEED_NODE"
DEFAULT_SEED_PATH = "/data/dump.rdb"
_SOURCE_FIELDS = ("Bucket", "Key", "VersionId", "Sha256", "Size")


def progress_part(node: str) -> str:
    """The seed's part in the restore's progress (its download, and why it failed)."""
    return f"seed-{node}"


def seed_environment(source: dict[str, Any], target: str, node: str) -> list[dict[str, str]]:
    """The seed container's environment overrides for one node loading ``source`` (a restore source)."""
    document = {k: source[k] for k in _SOURCE_FIELDS if source.get(k) is not None}
    return [
        {"name": SEED_SOURCE_ENV, "value": json.dumps(document, separators=(",", ":"))},
        {"name": SEED_TARGET_ENV, "value": target},
        {"name": SEED_NODE_ENV, "value": node},
    ]


def parse_source(text: str) -> dict[str, Any]:
    try:
        source = json.loads(text)
    except ValueError as exc:
        raise InvalidParameterValue(f"{SEED_SOURCE_ENV} is not JSON: {exc}") from exc
    if not isinstance(source, dict) or not source.get("Bucket") or not source.get("Key"):
        raise InvalidParameterValue(f"{SEED_SOURCE_ENV} must name a Bucket and a Key, got {text[:200]!r}")
    if not source.get("Sha256"):
        raise InvalidParameterValue(f"{SEED_SOURCE_ENV}: a node is only seeded from an object pinned by its SHA-256")
    return source


def seed_rdb(source: dict[str, Any], path: str, *, on_bytes: Callable[[int], None] | None = None) -> int:
    """Write the checked object to ``path`` (via ``path.part``); the bytes written."""
    from cachevault.catalog import storage  # boto3: only a node that has something to seed loads it
    from cachevault.core.aws import client

    part = path + ".part"
    reader = storage.S3RangeReader(
        client("s3"),
        source["Bucket"],
        source["Key"],
        expected_sha256=source["Sha256"],
        size=source.get("Size"),
        version_id=source.get("VersionId"),
        on_bytes=on_bytes,
    )
    written = 0
    try:
        with reader, open(part, "wb") as out:
            while chunk := reader.read(storage.RANGE_SIZE):  # the last read checks size and digest
                out.write(chunk)
                written += len(chunk)
            if reader.sha256 is None:  # an empty object: nothing was read, so nothing was checked
                raise InvalidParameterValue(f"s3://{source['Bucket']}/{source['Key']} is empty: not an RDB")
        os.replace(part, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
        raise
    return written
