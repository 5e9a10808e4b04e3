"""Status changes reach EventBridge: an SQS queue behind a rule on the bus sees them.

The rule is what a user would write to alarm on failures (``source: cachevault``);
moto delivers put_events to SQS targets, so the queue holds exactly what the handlers
published. The snapshots and restores here are real (redis-server nodes, state machines).
``EventListener`` and ``bus_listener`` are reused by the copy and S3 import tests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cachevault.catalog import events
from cachevault.core.aws import client
from cachevault.core.errors import CacheVaultError

from tests.product_fixtures import (
    Product,
    fill,
    node_addresses,
    node_id_at,
    slow_down_saves,
    sync_replicas,
    wait_until,
)


class EventListener:
    """A rule on the product's bus (``source: cachevault``) delivering to an SQS queue."""

    def __init__(self, product: Product) -> None:
        # The deployed functions' EVENT_BUS_NAME is the bus the handlers publish to.
        fn = product.env.deployed.functions["SnapshotCopyCompleteFunction"]
        self.bus = fn.env["EVENT_BUS_NAME"]
        self.ev = client("events")
        try:
            self.ev.describe_event_bus(Name=self.bus)
        except ClientError:
            # The local deployer does not create AWS::Events::EventBus yet: do what CFN would.
            self.ev.create_event_bus(Name=self.bus)
        sqs = client("sqs")
        self.sqs = sqs
        self.queue = sqs.create_queue(QueueName=f"cv-events-{int(time.time() * 1000)}")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=self.queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        self.ev.put_rule(
            Name="cachevault-status-changes",
            EventBusName=self.bus,
            EventPattern=json.dumps({"source": [events.SOURCE]}),
        )
        self.ev.put_targets(Rule="cachevault-status-changes", EventBusName=self.bus, Targets=[{"Id": "q", "Arn": arn}])
        self.seen: list[dict[str, Any]] = []

    def drain(self) -> list[dict[str, Any]]:
        for _ in range(100):  # bounded: 10 messages a call
            batch = self.sqs.receive_message(QueueUrl=self.queue, MaxNumberOfMessages=10).get("Messages", [])
            if not batch:
                break
            for message in batch:
                self.seen.append(json.loads(message["Body"]))
                self.sqs.delete_message(QueueUrl=self.queue, ReceiptHandle=message["ReceiptHandle"])
        return self.seen

    def find(self, detail_type: str, **detail: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.drain()
            if e["detail-type"] == detail_type and all(e["detail"].get(k) == v for k, v in detail.items())
        ]

    def one(self, detail_type: str, timeout: float = 10, **detail: Any) -> dict[str, Any]:
        found = wait_until(lambda: self.find(detail_type, **detail), timeout, f"{detail_type} {detail}")
        assert len(found) == 1, found
        assert found[0]["source"] == "cachevault"
        return found[0]["detail"]


@pytest.fixture(scope="module")
def bus_listener(product: Product) -> EventListener:
    return EventListener(product)


# ------------------------------------------------------------------------------ snapshots
@pytest.fixture(scope="module")
def watched_cache(product: Product, bus_listener: EventListener) -> Iterator[dict[str, Any]]:
    from cachevault.catalog import caches

    cache = caches.create_local_cache("evsrc", replicas=2, settings=product.settings)
    try:
        fill(cache["Endpoints"][0], keys=600, seed=21)
        sync_replicas(cache["Endpoints"][0], 2)
        yield cache
    finally:
        caches.delete_local_cache(cache["CacheName"], product.settings)


def test_snapshot_created_and_restore_completed(
    product: Product, bus_listener: EventListener, watched_cache: dict[str, Any]
) -> None:
    product.control.create_snapshot(watched_cache["CacheName"], "ev-ok")
    record = product.control.wait_snapshot("ev-ok", timeout_s=60)

    detail = bus_listener.one("Snapshot Created", SnapshotName="ev-ok")
    assert detail["ReplicationGroupId"] == watched_cache["CacheName"]
    assert detail["SnapshotStatus"] == "available" and detail["SnapshotSource"] == "manual"
    assert detail["CacheSize"] == record["CacheSize"]
    assert "FailureReason" not in detail

    arn, name = product.control.restore("ev-restored", snapshot="ev-ok")
    try:
        product.control.wait_restore(arn, name, timeout_s=60)
        restored = bus_listener.one("Restore Completed", ReplicationGroupId="ev-restored")
        assert restored["SnapshotName"] == "ev-ok" and restored["Status"] == "available"
        assert restored["RestoreSource"] == "ev-ok"
    finally:
        from cachevault.catalog import caches

        caches.delete_local_cache(name, product.settings)
    assert bus_listener.find("Snapshot Creation Failed") == [] and bus_listener.find("Restore Failed") == []


def test_capture_failure_and_restore_failure_are_published(
    product: Product, bus_listener: EventListener, watched_cache: dict[str, Any], tmp_path: Path
) -> None:
    # A real capture failure: the source replica dies while it streams its RDB.
    victim = node_addresses(watched_cache, "replica")[0]
    victim_id = node_id_at(watched_cache, victim)
    slow_down_saves([victim], 10_000)  # 600 keys * 10 ms: a 6 s save to kill in the middle
    product.control.create_snapshot(watched_cache["CacheName"], "ev-doomed", source_node=victim_id)

    def streaming() -> bool:
        nodes = product.control.describe_snapshot("ev-doomed").get("NodeSnapshots") or [{}]
        return nodes[0].get("CaptureStatus") == "running"

    wait_until(streaming, 30, "the capture to start streaming")
    product.kill_node(victim_id)
    with pytest.raises(CacheVaultError):
        product.control.wait_snapshot("ev-doomed", timeout_s=60)

    failed = bus_listener.one("Snapshot Creation Failed", SnapshotName="ev-doomed")
    assert failed["SnapshotStatus"] == "failed"
    assert failed["ReplicationGroupId"] == watched_cache["CacheName"]
    assert failed["FailureReason"].startswith("CaptureFailed: ")
    assert failed["FailureReason"] == product.control.describe_snapshot("ev-doomed")["FailureReason"]

    # A real restore failure: the source object is an RDB cut short (valid header, no end).
    rdb = b"REDIS0010\xfa\x09redis-ver\x067.0.15\xfe\x00\xfb\x01\x00\x00\x03key\x05va"
    client("s3").put_object(Bucket=product.bucket, Key="uploads/cut.rdb", Body=rdb)
    arn, name = product.control.restore("ev-broken", s3_sources=[f"s3://{product.bucket}/uploads/cut.rdb"])
    with pytest.raises(CacheVaultError):
        product.control.wait_restore(arn, name, timeout_s=60)
    broken = bus_listener.one("Restore Failed", ReplicationGroupId="ev-broken")
    assert broken["Status"] == "failed" and broken["FailureReason"]
    assert broken["FailureReason"] == product.control.catalog.get_cache("ev-broken")["FailureReason"]
    assert broken["RestoreSource"] == f"s3://{product.bucket}/uploads/cut.rdb"
    assert bus_listener.find("Restore Completed", ReplicationGroupId="ev-broken") == []


# ------------------------------------------------------------------------------ never fails a workflow
def test_publish_is_best_effort(product: Product, bus_listener: EventListener, monkeypatch: Any) -> None:
    monkeypatch.setenv("EVENT_BUS_NAME", bus_listener.bus)  # what Globals give every function
    assert events.publish("Snapshot Created", {"SnapshotName": "direct"}) is True
    assert bus_listener.one("Snapshot Created", SnapshotName="direct") == {"SnapshotName": "direct"}

    monkeypatch.setenv("EVENT_BUS_NAME", "no-such-bus")
    assert events.publish("Snapshot Created", {"SnapshotName": "lost"}) is False  # logged, not raised
    monkeypatch.delenv("EVENT_BUS_NAME")
    assert events.publish("Snapshot Created", {"SnapshotName": "lost"}) is False
    assert bus_listener.find("Snapshot Created", SnapshotName="lost") == []
