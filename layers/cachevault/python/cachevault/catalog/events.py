"""Status changes published to EventBridge so users can alarm on failures.

Every event has source ``cachevault`` and an ElastiCache-style detail-type
(``Snapshot Created``, ``Snapshot Creation Failed``, ``Snapshot Copy Failed``,
``Snapshot Export Failed``, ``Restore Completed``, ``Restore Failed`` ...); the detail
carries ElastiCache field names (SnapshotName, ReplicationGroupId, SnapshotStatus,
FailureReason). The bus is the template's CacheVaultEventBus (``EVENT_BUS_NAME``).

Publishing is best effort by design: a workflow that reached a terminal state must not
be undone because EventBridge was unreachable, so failures are logged, never raised.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from cachevault.catalog.snapshot_record import ELASTICACHE_SNAPSHOT_FIELDS
from cachevault.core.aws import client

SOURCE = "cachevault"
SNAPSHOT_CREATED = "Snapshot Created"
SNAPSHOT_CREATION_FAILED = "Snapshot Creation Failed"
SNAPSHOT_COPY_COMPLETED = "Snapshot Copy Completed"
SNAPSHOT_COPY_FAILED = "Snapshot Copy Failed"
SNAPSHOT_EXPORT_COMPLETED = "Snapshot Export Completed"
SNAPSHOT_EXPORT_FAILED = "Snapshot Export Failed"
RESTORE_COMPLETED = "Restore Completed"
RESTORE_FAILED = "Restore Failed"
DETAIL_TYPES = (
    SNAPSHOT_CREATED,
    SNAPSHOT_CREATION_FAILED,
    SNAPSHOT_COPY_COMPLETED,
    SNAPSHOT_COPY_FAILED,
    SNAPSHOT_EXPORT_COMPLETED,
    SNAPSHOT_EXPORT_FAILED,
    RESTORE_COMPLETED,
    RESTORE_FAILED,
)

# The snapshot record fields an event carries (ElastiCache's names).
_SNAPSHOT_FIELDS = (*ELASTICACHE_SNAPSHOT_FIELDS, "CacheSize", "FailureReason")
_CACHE_FIELDS = ("CacheNodeType", "ClusterMode", "NumNodeGroups", "ReplicasPerNodeGroup", "RestoreSource")

LOG = logging.getLogger(__name__)
_missing_buses: set[str] = set()  # warn once per process about a bus that does not exist


def _events_client() -> Any:
    # cachevault.core.aws caches clients per endpoint, region and credentials: each function
    # publishes with its own role's credentials (a per-endpoint cache would reuse another's).
    return client("events")


def bus_name() -> str | None:
    return os.environ.get("EVENT_BUS_NAME") or None


def publish(detail_type: str, detail: dict[str, Any]) -> bool:
    """Put one event on the bus; True when EventBridge accepted it. Never raises."""
    bus = bus_name()
    if bus is None:
        LOG.debug("EVENT_BUS_NAME not set: %s not published", detail_type)
        return False
    entry = {
        "Source": SOURCE,
        "DetailType": detail_type,
        "Detail": json.dumps({k: v for k, v in detail.items() if v is not None}, default=str),
        "EventBusName": bus,
    }
    try:
        response = _events_client().put_events(Entries=[entry])
    except Exception as exc:  # best effort: see the module docstring
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        if code == "ResourceNotFoundException":
            if bus not in _missing_buses:
                _missing_buses.add(bus)
                LOG.warning("event bus %s does not exist: events are not published (%s)", bus, exc)
        else:
            LOG.warning("could not publish %s to %s: %s", detail_type, bus, exc)
        return False
    if response.get("FailedEntryCount"):
        failed = response.get("Entries", [{}])[0]
        LOG.warning("EventBridge refused %s: %s %s", detail_type, failed.get("ErrorCode"), failed.get("ErrorMessage"))
        return False
    return True


def snapshot_status(detail_type: str, record: dict[str, Any], **fields: Any) -> bool:
    """Publish a snapshot's status change: the record's ElastiCache fields, ``fields`` win."""
    detail = {k: record.get(k) for k in _SNAPSHOT_FIELDS}
    detail.update(fields)
    return publish(detail_type, detail)


def restore_status(detail_type: str, cache_name: str, **fields: Any) -> bool:
    """Publish a restore's outcome, with the target cache's shape and source when known."""
    detail: dict[str, Any] = {"ReplicationGroupId": cache_name}
    try:
        from cachevault.catalog.records import Catalog

        cache = Catalog().find_cache(cache_name) or {}
        detail.update({k: cache.get(k) for k in _CACHE_FIELDS})
    except Exception as exc:  # the event still goes out, with less detail
        LOG.warning("could not read cache %s for its event: %s", cache_name, exc)
    detail.update(fields)
    return publish(detail_type, detail)
