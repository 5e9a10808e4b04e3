"""Snapshot deletion: S3 objects first, then the record (shared by the control plane and caches)."""

from __future__ import annotations

from typing import Any

from cachevault.catalog import storage
from cachevault.catalog.records import Catalog
from cachevault.core.aws import client
from cachevault.core.errors import InvalidSnapshotState
from cachevault.core.settings import Settings


def delete_snapshot(catalog: Catalog, name: str, settings: Settings) -> dict[str, Any]:
    """DeleteSnapshot: only an available or failed snapshot; S3 objects first, then the record."""
    record = catalog.get_snapshot(name)
    if record["SnapshotStatus"] not in ("available", "failed"):
        raise InvalidSnapshotState(
            f"Snapshot {name!r} is {record['SnapshotStatus']!r}; only an available or failed snapshot "
            "can be deleted."
        )
    catalog.update_snapshot(name, expect_status=record["SnapshotStatus"], SnapshotStatus="deleting")
    finish_deleting(catalog, record, settings)
    return {**record, "SnapshotStatus": "deleting"}


def finish_deleting(catalog: Catalog, record: dict[str, Any], settings: Settings) -> None:
    """What a ``deleting`` snapshot still holds: its uploads, its objects, then its record.

    Repeatable: ``ops/recovery.py`` finishes a deletion whose caller died half way."""
    s3 = client("s3")
    bucket = record.get("Bucket", settings.bucket)
    prefix = storage.snapshot_prefix(record["SnapshotName"])
    storage.abort_incomplete_uploads(s3, bucket, prefix)
    storage.delete_prefix(s3, bucket, prefix)
    catalog.delete_snapshot_record(record["SnapshotName"])
