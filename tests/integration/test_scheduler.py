"""Automatic backups end to end: the template's schedule fired at chosen instants.

The real SchedulerFunction runs inside the embedded AWS (template.yaml deployed), starts
real CreateSnapshot executions against real redis-server caches, and prunes real S3
objects and catalog records. Times are the EventBridge event's ``time``, so each test
picks its instant (a far-future date keeps the caches' windows independent of today).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cachevault.catalog import storage
from cachevault.core.aws import client
from cachevault.core.errors import InvalidParameterValue
from cachevault.ops import scheduler
from cachevault_tools.local.schedules import find_schedule, fire_schedule, schedule_input

from tests.product_fixtures import Product, fill, wait_until

SCHEDULE = "SchedulerFunctionTick"  # <LogicalId><event key> of the template's schedule
DAY = datetime(2031, 3, 4, tzinfo=UTC)


def at(hh: int, mm: int, day: datetime = DAY) -> datetime:
    return day.replace(hour=hh, minute=mm, second=37)


def fire(product: Product, when: datetime) -> dict[str, Any]:
    result = fire_schedule(product.env.deployed, SCHEDULE, now=when)
    assert result.function_error is None, result.payload
    return result.payload


def deliver(product: Product, event_text: str) -> dict[str, Any]:
    """Invoke the scheduler with an exact event (what a redelivered tick looks like)."""
    info = find_schedule(product.env.deployed, SCHEDULE)
    resp = client("lambda").invoke(FunctionName=info.target_arn, Payload=event_text.encode())
    body = json.loads(resp["Payload"].read())
    assert "FunctionError" not in resp, body
    return body


def automated(product: Product, cache: str) -> list[dict[str, Any]]:
    return product.control.catalog.all_snapshots(cache=cache, source="automated")


def wait_available(product: Product, name: str) -> dict[str, Any]:
    # The tick only starts the execution: its preflight makes the record a moment later.
    wait_until(lambda: product.control.catalog.find_snapshot(name), 30, f"record of {name}")
    return product.control.wait_snapshot(name, timeout_s=60)


def backups_cache(product: Product, new_cache: Any, retention: int, window: str = "05:00-06:00") -> str:
    name = new_cache("sched", replicas=0)["CacheName"]
    record = scheduler.modify_backup_settings(product.control.catalog, name, retention_limit=retention, window=window)
    assert record["SnapshotRetentionLimit"] == retention
    return name


def test_tick_in_window_takes_one_snapshot_and_duplicates_start_nothing(product: Product, new_cache: Any) -> None:
    cache = backups_cache(product, new_cache, retention=3)
    fill(product.control.catalog.get_cache(cache)["Endpoints"][0], keys=300)
    info = find_schedule(product.env.deployed, SCHEDULE)
    event = schedule_input(product.env.deployed, info, at(5, 20))

    first = deliver(product, event)
    expected = f"automatic.{cache}-2031-03-04-05-20"
    assert first["Started"] == [expected]
    # The same event again (same id): Powertools replays the stored result, nothing runs.
    again = deliver(product, event)
    assert again == first
    snapshot = wait_available(product, expected)
    assert snapshot["SnapshotSource"] == "automated"
    assert int(snapshot["CacheSize"]) > 0
    assert product.s3_keys(storage.snapshot_prefix(expected)) == sorted(
        [storage.rdb_key(expected, 1), storage.manifest_key(expected)]
    )

    # A new tick later in the same window (new id): the window already has its snapshot.
    later = fire(product, at(5, 50))
    assert later["Started"] == []
    assert any(expected in s["Reason"] for s in later["Skipped"])
    # A duplicate of the first minute with a new id: same name -> "already started".
    same_minute = deliver(product, schedule_input(product.env.deployed, info, at(5, 20)))
    assert same_minute["Started"] == []
    assert [s["SnapshotName"] for s in automated(product, cache)] == [expected]


def test_tick_outside_window_and_retention_zero_take_nothing(product: Product, new_cache: Any) -> None:
    outside = backups_cache(product, new_cache, retention=1, window="05:00-06:00")
    off = new_cache("sched-off", replicas=0)["CacheName"]
    assert (
        scheduler.modify_backup_settings(product.control.catalog, off, retention_limit=0, window="05:00-06:00")[
            "SnapshotRetentionLimit"
        ]
        == 0
    )
    result = fire(product, at(6, 0))  # the window is [05:00, 06:00): closed at 06:00
    assert result["Started"] == []
    inside = fire(product, at(5, 0))  # open for `outside` only; `off` has backups turned off
    assert inside["Started"] == [f"automatic.{outside}-2031-03-04-05-00"]
    wait_available(product, inside["Started"][0])
    assert automated(product, off) == []
    assert product.s3_keys(f"snapshots/automatic.{off}") == []


def test_retention_prunes_old_automated_snapshots_never_manual(product: Product, new_cache: Any) -> None:
    cache = backups_cache(product, new_cache, retention=2)
    catalog, s3 = product.control.catalog, product.s3
    now = at(7, 0)  # outside the window: this tick only prunes

    def insert(name: str, source: str, created: datetime) -> None:
        catalog.create_snapshot(
            {
                "SnapshotName": name,
                "ReplicationGroupId": cache,
                "SnapshotStatus": "available",
                "SnapshotSource": source,
                "SnapshotCreateTime": created.isoformat().replace("+00:00", "Z"),
                "NodeSnapshots": [],
            }
        )
        for key in (storage.rdb_key(name, 1), storage.manifest_key(name)):
            s3.put_object(Bucket=product.bucket, Key=key, Body=b"REDIS0010" + name.encode())

    old = [scheduler.automatic_name(cache, now - timedelta(days=d, hours=2)) for d in (3, 10)]
    recent = scheduler.automatic_name(cache, now - timedelta(days=1, hours=2))
    manual = f"{cache}-manual-old"
    for name in old:
        insert(name, "automated", datetime(2031, 1, 1, tzinfo=UTC))  # name time is what counts
    insert(recent, "automated", now - timedelta(days=1))
    insert(manual, "manual", now - timedelta(days=90))

    result = fire(product, now)
    assert sorted(result["Pruned"]) == sorted(old)
    assert result["Started"] == []
    for name in old:
        assert catalog.find_snapshot(name) is None
        assert product.s3_keys(storage.snapshot_prefix(name)) == []
    for name in (recent, manual):
        assert catalog.get_snapshot(name)["SnapshotStatus"] == "available"
        assert len(product.s3_keys(storage.snapshot_prefix(name))) == 2


def test_fire_schedule_command_path_finds_the_deployed_rule(product: Product, new_cache: Any) -> None:
    """What `cachevault local fire-schedule` does: rule + target read back from EventBridge."""
    # Imported here, not at collection: the CLI package must not be what first imports the
    # handlers' Powertools module in this process (it reads the Lambda env when imported).
    from cachevault_tools.cli.local_cmd import fire_deployed_schedule

    cache = backups_cache(product, new_cache, retention=1, window="23:30-00:30")  # crosses midnight
    result = fire_deployed_schedule(product.control.stack, "SchedulerFunction-Tick", at="2031-03-05T00:10:00Z")
    assert result["FunctionError"] is None, result["Payload"]
    expected = f"automatic.{cache}-2031-03-05-00-10"
    assert result["Payload"]["Started"] == [expected]
    wait_available(product, expected)
    with pytest.raises(InvalidParameterValue, match="no schedule"):
        fire_deployed_schedule(product.control.stack, "NoSuchSchedule")


BAD_SETTINGS = [
    (36, None, "between 0 and 35"),
    (-1, None, "between 0 and 35"),
    (1, "05:00-05:30", "at least 60 minutes"),
    (1, "5:00-6:00", "hh24:mi-hh24:mi"),
    (1, "05:00-05:00", "at least 60 minutes"),
]


def test_backup_settings_are_validated(product: Product, new_cache: Any) -> None:
    name = new_cache("sched-bad", replicas=0)["CacheName"]
    for retention, window, message in BAD_SETTINGS:
        with pytest.raises(InvalidParameterValue, match=message):
            scheduler.modify_backup_settings(product.control.catalog, name, retention_limit=retention, window=window)
    record = product.control.catalog.get_cache(name)
    assert "SnapshotRetentionLimit" not in record and "SnapshotWindow" not in record


def test_window_arithmetic() -> None:
    assert scheduler.window_opened("23:30-00:30", at(0, 10)) == at(23, 30, DAY - timedelta(days=1)).replace(second=0)
    assert scheduler.window_opened("23:30-00:30", at(0, 30)) is None
    assert scheduler.window_opened("05:00-06:00", at(4, 59)) is None
    assert scheduler.backup_fields(None, retention_limit=5, window=None)["SnapshotWindow"] == scheduler.DEFAULT_WINDOW
