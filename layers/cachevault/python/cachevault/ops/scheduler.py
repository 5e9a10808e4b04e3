"""Automatic backups: backup settings per cache, the scheduler tick, retention pruning.

ElastiCache's model: a cache has ``SnapshotRetentionLimit`` (days, 0 = automatic backups
off, at most 35) and ``SnapshotWindow`` (UTC ``hh24:mi-hh24:mi``, at least 60 minutes).
An EventBridge schedule (template.yaml, ``rate(15 minutes)``: at least four ticks fall in
every window, so a tick that finds the cache busy is retried inside the same window)
invokes the scheduler; each tick, at the event's ``time`` (not the wall clock, so a test
or a replay can fire any instant):

* starts a CreateSnapshot execution (source ``automated``, name
  ``automatic.<cache>-YYYY-MM-DD-HH-MM`` = the tick's minute) for every cache whose window
  is open and that has no automated snapshot since that window opened;
* deletes automated snapshots older than the retention (S3 objects and record, through
  ``ControlPlane.delete_snapshot``); manual snapshots are never pruned.

A tick is idempotent twice over: Powertools idempotency on the event ``id`` (a duplicate
delivery returns the first result) and the snapshot name, which is unique per cache and
minute (an existing record or execution of that name means "already started").
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError

from cachevault.catalog.records import Catalog
from cachevault.core import names
from cachevault.core.errors import CacheVaultError, InvalidParameterValue
from cachevault.core.settings import Settings
from cachevault.core.stack import StackInfo
from cachevault.core.timeutil import parse_iso, utcnow
from cachevault.ops.control_plane import CREATE_SNAPSHOT, ControlPlane

RETENTION_MAX_DAYS = 35  # ElastiCache's SnapshotRetentionLimit maximum
WINDOW_MIN_MINUTES = 60  # ElastiCache: the window must be at least 60 minutes long
DEFAULT_WINDOW = "05:00-06:00"  # used when retention is turned on without a window
CREATE_SNAPSHOT_ARN_ENV = "CREATE_SNAPSHOT_STATE_MACHINE_ARN"
IDEMPOTENCY_TTL_S = 3600  # a redelivered tick arrives within minutes; the next tick has a new id



def _observability() -> tuple[Any, Any]:
    """Powertools logger and metrics, imported on first use, never at import time.

    ``cachevault.core.handler`` builds them from the Lambda environment when first imported;
    the CLI imports this module (backup settings) in processes that also host the local
    Lambda runtime, so an early import would leave every handler without its namespace.
    """
    from cachevault.core.handler import logger, metrics

    return logger, metrics

_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
_MINUTES_PER_DAY = 24 * 60


# ---------------------------------------------------------------------------- settings
def parse_window(text: str) -> tuple[int, int]:
    """``hh:mm-hh:mm`` -> (start minute of day, length in minutes); may cross midnight."""
    m = _WINDOW.match((text or "").strip())
    if not m:
        raise InvalidParameterValue(
            f"SnapshotWindow {text!r} is invalid: use the UTC format hh24:mi-hh24:mi, e.g. 05:00-06:00."
        )
    start = int(m.group(1)) * 60 + int(m.group(2))
    end = int(m.group(3)) * 60 + int(m.group(4))
    length = (end - start) % _MINUTES_PER_DAY
    if length < WINDOW_MIN_MINUTES:
        raise InvalidParameterValue(
            f"SnapshotWindow {text!r} is invalid: the window must be at least {WINDOW_MIN_MINUTES} minutes long."
        )
    return start, length


def validate_retention(value: Any) -> int:
    try:
        days = int(value)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterValue(f"SnapshotRetentionLimit must be a whole number of days, not {value!r}.") from exc
    if not 0 <= days <= RETENTION_MAX_DAYS or str(value).strip() != str(days):
        raise InvalidParameterValue(
            f"SnapshotRetentionLimit must be between 0 and {RETENTION_MAX_DAYS} days, got {value!r}."
        )
    return days


def backup_fields(current: dict[str, Any] | None, *, retention_limit: int | None, window: str | None) -> dict[str, Any]:
    """The validated ``SnapshotRetentionLimit``/``SnapshotWindow`` to store on a cache record."""
    fields: dict[str, Any] = {}
    if retention_limit is not None:
        fields["SnapshotRetentionLimit"] = validate_retention(retention_limit)
    if window is not None:
        parse_window(window)
        fields["SnapshotWindow"] = window.strip()
    retention = fields.get("SnapshotRetentionLimit", (current or {}).get("SnapshotRetentionLimit", 0))
    if retention and not fields.get("SnapshotWindow", (current or {}).get("SnapshotWindow")):
        fields["SnapshotWindow"] = DEFAULT_WINDOW
    return fields


def modify_backup_settings(
    catalog: Catalog, cache: str, *, retention_limit: int | None = None, window: str | None = None
) -> dict[str, Any]:
    """ModifyReplicationGroup for the backup settings; returns the updated record."""
    name = names.cache_name(cache)
    if retention_limit is None and window is None:
        raise InvalidParameterValue("Nothing to modify: give --snapshot-retention-limit and/or --snapshot-window.")
    record = catalog.get_cache(name)
    fields = backup_fields(record, retention_limit=retention_limit, window=window)
    catalog.update_cache(name, **fields)
    return catalog.get_cache(name)


def window_opened(window: str, at: datetime) -> datetime | None:
    """When the occurrence of ``window`` containing ``at`` opened; None if it is closed at ``at``."""
    start, length = parse_window(window)
    at = at.astimezone(UTC)
    midnight = at.replace(hour=0, minute=0, second=0, microsecond=0)
    for day in (midnight, midnight - timedelta(days=1)):  # a window may have opened yesterday
        opened = day + timedelta(minutes=start)
        if opened <= at < opened + timedelta(minutes=length):
            return opened
    return None


def automatic_name(cache: str, at: datetime) -> str:
    return f"{names.AUTOMATIC_PREFIX}{cache}-{at.astimezone(UTC):%Y-%m-%d-%H-%M}"


def snapshot_time(record: dict[str, Any]) -> datetime:
    """An automated snapshot's time: the tick minute in its name, else its create time.

    The name carries the tick's time, which is what the window and retention logic
    reason in (the record's create time is the wall clock of the preflight).
    """
    m = re.search(r"-(\d{4})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$", record.get("SnapshotName", ""))
    if m and record["SnapshotName"].startswith(names.AUTOMATIC_PREFIX):
        return datetime(*(int(g) for g in m.groups()), tzinfo=UTC)
    return parse_iso(record["SnapshotCreateTime"])


# -------------------------------------------------------------------------------- tick
def lambda_control_plane(settings: Settings | None = None) -> ControlPlane:
    """The control plane inside a Lambda: resource names from its environment."""
    settings = settings or Settings.from_env()
    machines = {}
    if os.environ.get(CREATE_SNAPSHOT_ARN_ENV):
        machines[CREATE_SNAPSHOT] = os.environ[CREATE_SNAPSHOT_ARN_ENV]
    info = StackInfo(
        bucket=settings.bucket,
        snapshots_table=settings.snapshots_table,
        caches_table=settings.caches_table,
        progress_table=settings.progress_table,
        idempotency_table=settings.idempotency_table,
        state_machines=machines,
    )
    return ControlPlane(info, settings)


def tick_time(event: dict[str, Any]) -> datetime:
    """The EventBridge event's ``time``, truncated to the minute (wall clock if absent)."""
    raw = event.get("time")
    when = parse_iso(raw) if raw else utcnow()
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).replace(second=0, microsecond=0)


def start_automatic_snapshot(control: ControlPlane, cache: str, at: datetime) -> tuple[str, str]:
    """Start CreateSnapshot for ``cache`` at tick ``at``: (snapshot name, "started"|"already-started").

    Does not wait for the preflight: the execution runs on its own (its failure is the
    snapshot's ``failed`` status and FailureReason, as for any snapshot).
    """
    snapshot = automatic_name(cache, at)
    if control.catalog.find_snapshot(snapshot) is not None:
        return snapshot, "already-started"
    payload = {
        "SnapshotName": snapshot,
        "ReplicationGroupId": cache,
        "SnapshotSource": "automated",
        "SourceNode": None,
        "FinalSnapshot": False,
        "PollSeconds": 1,
    }
    # One execution name per cache and minute: a second start of the same snapshot is
    # refused by Step Functions (ExecutionAlreadyExists) before preflight even runs.
    execution = f"auto-{cache}-{at:%Y%m%dT%H%M}"[:80]
    try:
        control.start(CREATE_SNAPSHOT, execution, payload)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") == "ExecutionAlreadyExists":
            return snapshot, "already-started"
        raise
    return snapshot, "started"


def prune(control: ControlPlane, cache: dict[str, Any], at: datetime) -> list[str]:
    """Delete the cache's automated snapshots older than its retention; manual ones stay."""
    retention = int(cache.get("SnapshotRetentionLimit") or 0)
    if retention <= 0:
        return []
    cutoff = at - timedelta(days=retention)
    pruned = []
    for record in control.catalog.all_snapshots(cache=cache["CacheName"], source="automated"):
        if record.get("SnapshotSource") != "automated":
            continue  # belt and braces: a manual snapshot is never pruned
        if record.get("SnapshotStatus") not in ("available", "failed") or snapshot_time(record) >= cutoff:
            continue
        try:
            control.delete_snapshot(record["SnapshotName"])
        except CacheVaultError as err:  # changed under us (e.g. being restored from): next tick
            _observability()[0].warning("could not prune", snapshot=record["SnapshotName"], error=str(err))
            continue
        pruned.append(record["SnapshotName"])
    return pruned


def run_tick(event: dict[str, Any], control: ControlPlane | None = None) -> dict[str, Any]:
    """One scheduler pass at the event's time (see the module docstring)."""
    logger, metrics = _observability()
    control = control or lambda_control_plane()
    at = tick_time(event)
    started, skipped, pruned = [], [], []
    for cache in control.catalog.list_caches():
        name = cache["CacheName"]
        retention = int(cache.get("SnapshotRetentionLimit") or 0)
        if retention <= 0:
            continue
        pruned.extend(prune(control, cache, at))
        opened = window_opened(cache.get("SnapshotWindow") or DEFAULT_WINDOW, at)
        if opened is None:
            continue
        taken = [
            s["SnapshotName"]
            for s in control.catalog.all_snapshots(cache=name, source="automated")
            if s.get("SnapshotStatus") != "failed" and opened <= snapshot_time(s) <= at
        ]
        if taken:
            skipped.append({"CacheName": name, "Reason": f"already has {taken[0]} in this window"})
            continue
        if cache.get("Status") != "available" or cache.get("LockedBy"):
            # A later tick inside the same window tries again.
            skipped.append({"CacheName": name, "Reason": f"busy ({cache.get('LockedFor') or cache.get('Status')})"})
            continue
        try:
            snapshot, outcome = start_automatic_snapshot(control, name, at)
        except (CacheVaultError, ClientError) as err:
            logger.error("automatic snapshot not started", cache=name, error=str(err))
            skipped.append({"CacheName": name, "Reason": str(err)})
            continue
        if outcome == "started":
            started.append(snapshot)
        else:
            skipped.append({"CacheName": name, "Reason": f"{snapshot} already started"})
    if started:
        metrics.add_metric(name="AutomaticSnapshotsStarted", unit="Count", value=len(started))
    if pruned:
        metrics.add_metric(name="AutomaticSnapshotsPruned", unit="Count", value=len(pruned))
    logger.info("scheduler tick", time=at.isoformat(), started=started, pruned=pruned, skipped=skipped)
    return {"Time": at.strftime("%Y-%m-%dT%H:%M:%SZ"), "Started": started, "Pruned": pruned, "Skipped": skipped}


def scheduler_tick(event: dict[str, Any]) -> dict[str, Any]:
    """The handler's step: ``run_tick`` once per EventBridge event ``id`` (Powertools idempotency)."""
    from aws_lambda_powertools.utilities.idempotency import (
        DynamoDBPersistenceLayer,
        IdempotencyConfig,
        idempotent_function,
    )

    from cachevault.core.aws import client

    settings = Settings.from_env()
    persistence = DynamoDBPersistenceLayer(table_name=settings.idempotency_table, boto3_client=client("dynamodb"))
    config = IdempotencyConfig(
        event_key_jmespath="id", raise_on_no_idempotency_key=True, expires_after_seconds=IDEMPOTENCY_TTL_S
    )
    from cachevault.core.handler import lambda_context

    context = lambda_context()
    if context is not None:  # lets Powertools expire an in-progress record when the invocation times out
        config.register_lambda_context(context)

    @idempotent_function(
        data_keyword_argument="event", persistence_store=persistence, config=config, key_prefix="scheduler-tick"
    )
    def once(event: dict[str, Any]) -> dict[str, Any]:
        return run_tick(event)

    return once(event=event)
