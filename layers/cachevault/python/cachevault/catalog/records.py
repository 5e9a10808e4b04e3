"""The catalog: snapshot records, the cache registry, quotas and locks (DynamoDB).

Records use ElastiCache's field names so ``--json`` output reads like the AWS CLI's.
Two tables from template.yaml: snapshots (hash ``SnapshotName``, GSI ``ByCache`` on
``ReplicationGroupId`` + ``SnapshotCreateTime``) and caches (hash ``CacheName``).
Every write that guards an invariant (unique names, one operation per cache) is a
conditional write, so concurrent requests cannot both win.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

from boto3.dynamodb.conditions import Attr, Key
from botocore.exceptions import ClientError

from cachevault.catalog import snapshot_record
from cachevault.core import aws
from cachevault.core.errors import (
    InvalidParameterValue,
    InvalidReplicationGroupState,
    InvalidSnapshotState,
    ReplicationGroupAlreadyExistsFault,
    ReplicationGroupNotFoundFault,
    SnapshotAlreadyExistsFault,
    SnapshotNotFoundFault,
)
from cachevault.core.settings import Settings
from cachevault.core.timeutil import iso

SNAPSHOT_STATUSES = ("creating", "available", "failed", "deleting", "restoring", "copying")
BY_CACHE_INDEX = "ByCache"


def _plain(value: Any) -> Any:
    """DynamoDB hands numbers back as Decimal; callers want ints/floats."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _dynamo(value: Any) -> Any:
    """Floats are not allowed by boto3's serializer: store them as Decimal."""
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, list):
        return [_dynamo(v) for v in value]
    if isinstance(value, dict):
        return {k: _dynamo(v) for k, v in value.items() if v is not None}
    return value


def _conditional_failed(err: ClientError) -> bool:
    return err.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


def _encode_marker(key: dict[str, Any] | None) -> str | None:
    if not key:
        return None
    return base64.urlsafe_b64encode(json.dumps(_plain(key)).encode()).decode()


def _decode_marker(marker: str | None) -> dict[str, Any] | None:
    if not marker:
        return None
    try:
        return json.loads(base64.urlsafe_b64decode(marker.encode()))
    except ValueError as exc:
        raise InvalidParameterValue(f"Marker {marker!r} is not a marker this service returned.") from exc


class Catalog:
    def __init__(self, settings: Settings | None = None, dynamodb: Any = None) -> None:
        self.settings = settings or Settings.from_env()
        db = dynamodb or aws.resource("dynamodb")
        self.snapshots = db.Table(self.settings.snapshots_table)
        self.caches = db.Table(self.settings.caches_table)
        self.progress = db.Table(self.settings.progress_table)

    # ---- cache registry -------------------------------------------------------------
    def register_cache(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {"CacheCreateTime": iso(), **record}
        try:
            self.caches.put_item(Item=_dynamo(record), ConditionExpression=Attr("CacheName").not_exists())
        except ClientError as err:
            if _conditional_failed(err):
                raise ReplicationGroupAlreadyExistsFault(
                    f"Replication group {record['CacheName']!r} already exists."
                ) from err
            raise
        return record

    def get_cache(self, name: str) -> dict[str, Any]:
        item = self.caches.get_item(Key={"CacheName": name}, ConsistentRead=True).get("Item")
        if not item:
            raise ReplicationGroupNotFoundFault(f"Replication group {name!r} not found.")
        return _plain(item)

    def find_cache(self, name: str) -> dict[str, Any] | None:
        item = self.caches.get_item(Key={"CacheName": name}, ConsistentRead=True).get("Item")
        return _plain(item) if item else None

    def list_caches(self) -> list[dict[str, Any]]:
        return sorted(_scan_all(self.caches), key=lambda c: c["CacheName"])

    def update_cache(self, name: str, *, expect_status: str | None = None, **fields: Any) -> None:
        _update(
            self.caches,
            {"CacheName": name},
            fields,
            must_exist="CacheName",
            expect=("Status", expect_status) if expect_status else None,
        )

    def delete_cache(self, name: str) -> None:
        self.caches.delete_item(Key={"CacheName": name})

    def lock_cache(self, name: str, owner: str, operation: str) -> None:
        """Take the cache's operation lock; a second operation gets a clear error.

        Not re-entrant: owners are snapshot names, and two requests for the same name
        are two operations. Were the lock taken again by the same owner, the request
        that loses the name race would release the winner's lock on its way out.
        """
        try:
            self.caches.update_item(
                Key={"CacheName": name},
                UpdateExpression="SET LockedBy = :o, LockedFor = :op, LockedAt = :t",
                ConditionExpression=Attr("CacheName").exists() & Attr("LockedBy").not_exists(),
                ExpressionAttributeValues={":o": owner, ":op": operation, ":t": iso()},
            )
        except ClientError as err:
            if not _conditional_failed(err):
                raise
            cache = self.find_cache(name)
            if cache is None:
                raise ReplicationGroupNotFoundFault(f"Replication group {name!r} not found.") from err
            raise InvalidReplicationGroupState(
                f"Replication group {name!r} is busy: {cache.get('LockedFor', 'an operation')} "
                f"{cache.get('LockedBy')!r} is in progress.",
                LockedBy=cache.get("LockedBy"),
            ) from err

    def unlock_cache(self, name: str, owner: str) -> None:
        try:
            self.caches.update_item(
                Key={"CacheName": name},
                UpdateExpression="REMOVE LockedBy, LockedFor, LockedAt",
                ConditionExpression=Attr("LockedBy").eq(owner),
            )
        except ClientError as err:
            if not _conditional_failed(err):  # not ours (or already released): leave it
                raise

    # ---- snapshots --------------------------------------------------------------------
    def create_snapshot(self, record: dict[str, Any]) -> dict[str, Any]:
        try:
            self.snapshots.put_item(
                Item=_dynamo(snapshot_record.stored(record)), ConditionExpression=Attr("SnapshotName").not_exists()
            )
        except ClientError as err:
            if _conditional_failed(err):
                raise SnapshotAlreadyExistsFault(
                    f"Snapshot {record['SnapshotName']!r} already exists."
                ) from err
            raise
        return record

    def get_snapshot(self, name: str) -> dict[str, Any]:
        item = self.find_snapshot(name)
        if item is None:
            raise SnapshotNotFoundFault(f"Snapshot {name!r} not found.")
        return item

    def find_snapshot(self, name: str) -> dict[str, Any] | None:
        item = self.snapshots.get_item(Key={"SnapshotName": name}, ConsistentRead=True).get("Item")
        return snapshot_record.loaded(_plain(item)) if item else None

    def update_snapshot(self, name: str, *, expect_status: str | None = None, **fields: Any) -> None:
        if fields.get("NodeSnapshots"):
            fields["NodeSnapshots"] = snapshot_record.stored_nodes(name, fields["NodeSnapshots"])
        _update(
            self.snapshots,
            {"SnapshotName": name},
            fields,
            must_exist="SnapshotName",
            expect=("SnapshotStatus", expect_status) if expect_status else None,
        )

    # ---- capture progress: one item per (snapshot, shard), one writer each ----------------
    def set_capture_progress(self, name: str, node_group_id: str, fields: dict[str, Any]) -> None:
        self.progress.update_item(
            Key={"SnapshotName": name, "NodeGroupId": node_group_id},
            **_set_expression(fields),
        )

    def capture_progress(self, name: str) -> dict[str, dict[str, Any]]:
        """NodeGroupId -> the capture's progress fields."""
        page = self.progress.query(KeyConditionExpression=Key("SnapshotName").eq(name), ConsistentRead=True)
        return {i["NodeGroupId"]: _plain(i) for i in page.get("Items", [])}

    def delete_capture_progress(self, name: str) -> None:
        with self.progress.batch_writer() as batch:  # 25 per request: 500 shards in 20 calls
            for group in self.capture_progress(name):
                batch.delete_item(Key={"SnapshotName": name, "NodeGroupId": group})

    # ---- restore and copy progress: the same table, keyed "<operation>#<subject>" -------------
    # Names cannot contain "#", so these keys never collide with a snapshot's capture progress.
    def set_operation_progress(self, operation: str, subject: str, part: str, fields: dict[str, Any]) -> None:
        """One part (a download, a shard load, an object copy) of a restore or a copy, one writer each."""
        self.set_capture_progress(f"{operation}#{subject}", part, {**fields, "Heartbeat": time.time()})

    def operation_progress(self, operation: str, subject: str) -> dict[str, dict[str, Any]]:
        """Part -> its progress fields (``Phase``, ``Done``, ``Total``, ``Unit``, ``Status``)."""
        return self.capture_progress(f"{operation}#{subject}")

    def delete_operation_progress(self, operation: str, subject: str) -> None:
        self.delete_capture_progress(f"{operation}#{subject}")

    def describe_snapshot(self, name: str) -> dict[str, Any]:
        """The record with live capture progress merged into NodeSnapshots while creating."""
        record = self.get_snapshot(name)
        if record.get("SnapshotStatus") == "creating":
            progress = self.capture_progress(name)
            for node in record.get("NodeSnapshots", []):
                node.update(progress.get(node["NodeGroupId"], {}))
                node.pop("SnapshotName", None)
        return record

    def delete_snapshot_record(self, name: str) -> None:
        self.snapshots.delete_item(Key={"SnapshotName": name})

    def list_snapshots(
        self,
        *,
        cache: str | None = None,
        source: str | None = None,
        max_records: int = 50,
        marker: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of snapshots, newest first when filtered by cache (ElastiCache paging)."""
        if not 20 <= max_records <= 100 and max_records != 0:
            # ElastiCache's documented MaxRecords range; 0 is our "everything" for internal use.
            raise InvalidParameterValue("MaxRecords must be between 20 and 100.")
        query: dict[str, Any] = {}
        if source:
            query["FilterExpression"] = Attr("SnapshotSource").eq(source)
        start = _decode_marker(marker)
        if start:
            query["ExclusiveStartKey"] = start
        items: list[dict[str, Any]] = []
        limit = max_records or None
        while True:
            if limit:
                query["Limit"] = limit - len(items)
            if cache:
                page = self.snapshots.query(
                    IndexName=BY_CACHE_INDEX,
                    KeyConditionExpression=Key("ReplicationGroupId").eq(cache),
                    ScanIndexForward=False,
                    **query,
                )
            else:
                page = self.snapshots.scan(**query)
            items.extend(snapshot_record.loaded(_plain(i)) for i in page.get("Items", []))
            last = page.get("LastEvaluatedKey")
            if not last or (limit and len(items) >= limit):
                break
            query["ExclusiveStartKey"] = last
        if not cache:
            items.sort(key=lambda s: s["SnapshotName"])
        return items, _encode_marker(last)

    def all_snapshots(self, *, cache: str | None = None, source: str | None = None) -> list[dict[str, Any]]:
        items, _ = self.list_snapshots(cache=cache, source=source, max_records=0)
        return items

    def snapshots_created_since(self, cache: str, since: datetime, *, source: str) -> list[dict[str, Any]]:
        page = self.snapshots.query(
            IndexName=BY_CACHE_INDEX,
            KeyConditionExpression=Key("ReplicationGroupId").eq(cache)
            & Key("SnapshotCreateTime").gte(iso(since)),
            FilterExpression=Attr("SnapshotSource").eq(source),
        )
        items = [snapshot_record.loaded(_plain(i)) for i in page.get("Items", [])]
        while page.get("LastEvaluatedKey"):
            page = self.snapshots.query(
                IndexName=BY_CACHE_INDEX,
                KeyConditionExpression=Key("ReplicationGroupId").eq(cache)
                & Key("SnapshotCreateTime").gte(iso(since)),
                FilterExpression=Attr("SnapshotSource").eq(source),
                ExclusiveStartKey=page["LastEvaluatedKey"],
            )
            items.extend(snapshot_record.loaded(_plain(i)) for i in page.get("Items", []))
        return items


def _scan_all(table: Any) -> Iterator[dict[str, Any]]:
    page = table.scan()
    yield from (_plain(i) for i in page.get("Items", []))
    while page.get("LastEvaluatedKey"):
        page = table.scan(ExclusiveStartKey=page["LastEvaluatedKey"])
        yield from (_plain(i) for i in page.get("Items", []))


def _set_expression(fields: dict[str, Any]) -> dict[str, Any]:
    names, values, sets = {}, {}, []
    for i, (field, value) in enumerate(fields.items()):
        names[f"#u{i}"] = field
        values[f":u{i}"] = _dynamo(value)
        sets.append(f"#u{i} = :u{i}")
    return {
        "UpdateExpression": "SET " + ", ".join(sets),
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
    }


# Placeholders use the "u" prefix: boto3's condition builder numbers its own "#n0"/":v0".
def _update(
    table: Any,
    key: dict[str, Any],
    fields: dict[str, Any],
    *,
    must_exist: str,
    expect: tuple[str, str] | None = None,
) -> None:
    sets, removes, names, values = [], [], {}, {}
    for i, (field, value) in enumerate(fields.items()):
        names[f"#u{i}"] = field
        if value is None:
            removes.append(f"#u{i}")
        else:
            values[f":u{i}"] = _dynamo(value)
            sets.append(f"#u{i} = :u{i}")
    expr = []
    if sets:
        expr.append("SET " + ", ".join(sets))
    if removes:
        expr.append("REMOVE " + ", ".join(removes))
    if not expr:
        return
    condition = Attr(must_exist).exists()
    if expect:
        condition = condition & Attr(expect[0]).eq(expect[1])
    args: dict[str, Any] = {
        "Key": key,
        "UpdateExpression": " ".join(expr),
        "ExpressionAttributeNames": names,
        "ConditionExpression": condition,
    }
    if values:
        args["ExpressionAttributeValues"] = values
    try:
        table.update_item(**args)
    except ClientError as err:
        if not _conditional_failed(err):
            raise
        name = next(iter(key.values()))
        if expect and must_exist == "SnapshotName":
            raise InvalidSnapshotState(f"Snapshot {name!r} is not {expect[1]!r}; nothing was changed.") from err
        if expect:
            raise InvalidReplicationGroupState(
                f"Replication group {name!r} is not {expect[1]!r}; nothing was changed."
            ) from err
        if must_exist == "SnapshotName":
            raise SnapshotNotFoundFault(f"Snapshot {name!r} not found.") from err
        raise ReplicationGroupNotFoundFault(f"Replication group {name!r} not found.") from err
