"""S3 import trigger: an RDB uploaded under ``imports/`` becomes a restored cache.

The template subscribes the S3 import function to ``s3:ObjectCreated:*`` on the
snapshot bucket, filtered to ``imports/*.rdb``. For each object it:

1. records the import (ImportsTable, one item per object version: a notification S3
   delivers twice is recognised and ignored),
2. names the cache: the object's ``x-amz-meta-cache-name`` if set, else the key's file
   name (``imports/orders-2026.rdb`` -> ``orders-2026``) sanitized to ElastiCache's
   naming rules; a name that cannot be made valid is a recorded failure,
3. checks the object starts with the RDB magic (a ranged GET of 9 bytes),
4. only STARTS a RestoreSnapshot execution (``SnapshotArns`` = the object) and records
   its ARN. S3 may run this handler synchronously (moto runs it inside PutObject), so it
   must never wait for the restore.

moto 5.2.1 quirk: PutObject and CompleteMultipartUpload notify (synchronously) before
they store the object's metadata, so locally the metadata name is seen only for objects
copied into ``imports/`` (CopyObject with ``MetadataDirective=REPLACE``, ``aws s3 cp
s3://.../x.rdb s3://.../imports/x.rdb --metadata cache-name=NAME``); real S3 notifies
after the object is complete, metadata included.

The outcome is resolved from the restore itself (the cache record, else the execution)
when imports are listed, and written back once it is final.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any
from urllib.parse import unquote_plus

from boto3.dynamodb.conditions import Attr
from botocore.exceptions import ClientError

from cachevault.catalog import events
from cachevault.catalog.records import Catalog, _plain
from cachevault.core import names
from cachevault.core.aws import client, resource
from cachevault.core.errors import (
    CacheVaultError,
    ImportNotFoundFault,
    InvalidParameterValue,
    ReplicationGroupAlreadyExistsFault,
)
from cachevault.core.settings import Settings
from cachevault.core.timeutil import iso

IMPORTS_PREFIX = "imports/"
NAME_METADATA = "cache-name"  # x-amz-meta-cache-name
RDB_MAGIC = re.compile(rb"^REDIS\d{4}$")
FINAL = ("available", "failed")
# Plain logging (a child of the Powertools logger inside a Lambda): the CLI imports this
# module too, and must not create Powertools objects before a handler's environment exists.
logger = logging.getLogger(__name__)


def table_name(settings: Settings | None = None) -> str:
    return (settings or Settings.from_env()).imports_table


def _table(settings: Settings | None = None) -> Any:
    return resource("dynamodb").Table(table_name(settings))


def cache_name_from_key(key: str) -> str:
    """``imports/Orders_2026.rdb`` -> ``orders-2026``; InvalidParameterValue if it cannot be valid."""
    stem = key.rsplit("/", 1)[-1]
    if stem.lower().endswith(".rdb"):
        stem = stem[: -len(".rdb")]
    candidate = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")
    try:
        return names.cache_name(candidate)
    except InvalidParameterValue as exc:
        raise InvalidParameterValue(
            f"Cannot name a cache after {key!r} (made {candidate!r}): {exc.message} "
            f"Set the object metadata x-amz-meta-{NAME_METADATA} to choose the name."
        ) from exc


def import_id(bucket: str, key: str, version: str) -> str:
    return "imp-" + hashlib.sha256(f"{bucket}\0{key}\0{version}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- the trigger
def s3_import_step(event: dict[str, Any]) -> dict[str, Any]:
    """The S3 notification handler: one import per created object."""
    results = []
    for record in event.get("Records", []):
        if not str(record.get("eventName", "")).startswith("ObjectCreated"):
            continue
        s3 = record["s3"]
        key = unquote_plus(s3["object"]["key"])  # notifications carry URL-encoded keys
        # S3's sequencer orders the PUTs of one key (moto sends none: then the ETag decides).
        obj = s3["object"]
        version = "/".join(str(obj.get(k) or "") for k in ("versionId", "sequencer", "eTag"))
        results.append(start_import(s3["bucket"]["name"], key, version=version))
    return {"Imports": results}


def start_import(bucket: str, key: str, *, version: str = "") -> dict[str, Any]:
    """Record the import and start its restore; refusals are recorded, never raised."""
    settings = Settings.from_env()
    table = _table(settings)
    item: dict[str, Any] = {
        "ImportId": import_id(bucket, key, version),
        "Bucket": bucket,
        "Key": key,
        "SnapshotArn": f"arn:aws:s3:::{bucket}/{key}",
        "Status": "received",
        "ImportTime": iso(),
    }
    try:
        # A redelivered notification is ignored unless its import failed: then it is a retry.
        table.put_item(Item=item, ConditionExpression=Attr("ImportId").not_exists() | Attr("Status").eq("failed"))
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
            logger.info("duplicate import notification ignored: %s (%s)", key, item["ImportId"])
            return {**item, "Status": "duplicate"}
        raise
    try:
        _begin_restore(settings, item)
        item["Status"] = "restoring"
    except (CacheVaultError, ClientError) as exc:
        item.update(Status="failed", FailureReason=_reason(exc), CompleteTime=iso())
        events.publish(
            events.RESTORE_FAILED,
            {
                "ReplicationGroupId": item.get("CacheName"),
                "RestoreSource": item["SnapshotArn"],
                "ImportId": item["ImportId"],
                "FailureReason": item["FailureReason"],
            },
        )
        _count("ImportFailures")
        logger.warning("import of %s refused: %s", key, item["FailureReason"])
    table.put_item(Item={k: v for k, v in item.items() if v is not None})
    return item


def _begin_restore(settings: Settings, found: dict[str, Any]) -> None:
    """Fill ``found`` (the import record) step by step, so a refusal still records what was known."""
    bucket, key = found["Bucket"], found["Key"]
    s3 = client("s3")
    head = s3.head_object(Bucket=bucket, Key=key)
    found.update(Size=int(head["ContentLength"]), ETag=head.get("ETag", "").strip('"'))
    wanted = (head.get("Metadata") or {}).get(NAME_METADATA)
    found["NameSource"] = "metadata" if wanted else "key"
    found["RequestedName"] = wanted or key.rsplit("/", 1)[-1]
    found["CacheName"] = names.cache_name(wanted) if wanted else cache_name_from_key(key)
    _check_rdb_magic(s3, bucket, key, found["Size"])
    if Catalog(settings).find_cache(found["CacheName"]) is not None:
        raise ReplicationGroupAlreadyExistsFault(
            f"Replication group {found['CacheName']!r} already exists; nothing was restored. Upload with "
            f"x-amz-meta-{NAME_METADATA} set to a new name."
        )
    machine = os.environ.get("RESTORE_SNAPSHOT_STATE_MACHINE_ARN")
    if not machine:
        raise CacheVaultError("RESTORE_SNAPSHOT_STATE_MACHINE_ARN is not set: the import cannot start a restore.")
    from cachevault.ops.control_plane import execution_name  # the control plane's execution naming

    execution = execution_name("import", found["CacheName"])
    payload = {"ReplicationGroupId": found["CacheName"], "SnapshotArns": [f"arn:aws:s3:::{bucket}/{key}"]}
    arn = client("stepfunctions").start_execution(stateMachineArn=machine, name=execution, input=json.dumps(payload))[
        "executionArn"
    ]
    _count("ImportsStarted")
    found.update(ExecutionName=execution, ExecutionArn=arn)
    logger.info("import of %s: restore into %s started (%s)", key, found["CacheName"], execution)


def _count(metric: str) -> None:
    from cachevault.core.handler import metrics  # only ever reached inside the Lambda handler

    metrics.add_metric(name=metric, unit="Count", value=1)


def _reason(exc: Exception) -> str:
    if isinstance(exc, CacheVaultError):
        return f"{exc.code}: {exc.message}"
    error = getattr(exc, "response", {}).get("Error", {})  # S3: the object went away, access denied...
    return f"{error.get('Code', 'S3Error')}: could not read the uploaded object ({error.get('Message', exc)})"


def _check_rdb_magic(s3: Any, bucket: str, key: str, size: int) -> None:
    head = s3.get_object(Bucket=bucket, Key=key, Range="bytes=0-8")["Body"].read() if size else b""
    if not RDB_MAGIC.match(head):
        raise InvalidParameterValue(
            f"s3://{bucket}/{key} is not an RDB file: it does not start with the 'REDIS' magic and a "
            f"4-digit version (first bytes {head[:9]!r})."
        )


# ---------------------------------------------------------------------------------- reading
def list_imports(settings: Settings | None = None, *, sfn: Any = None) -> list[dict[str, Any]]:
    """Every import, newest first, with the outcome of restores that have finished since."""
    settings = settings or Settings.from_env()
    table = _table(settings)
    page = table.scan()
    items = [_plain(i) for i in page.get("Items", [])]
    while page.get("LastEvaluatedKey"):
        page = table.scan(ExclusiveStartKey=page["LastEvaluatedKey"])
        items.extend(_plain(i) for i in page.get("Items", []))
    catalog = Catalog(settings)
    resolved = [_resolve(table, catalog, item, sfn) for item in items]
    return sorted(resolved, key=lambda i: (i.get("ImportTime", ""), i["ImportId"]), reverse=True)


def describe_import(import_ref: str, settings: Settings | None = None, *, sfn: Any = None) -> dict[str, Any]:
    """One import by ImportId, object key or cache name (the newest match)."""
    for item in list_imports(settings, sfn=sfn):
        if import_ref in (item["ImportId"], item["Key"], item.get("CacheName")):
            return item
    raise ImportNotFoundFault(f"No import {import_ref!r} (give an ImportId, an object key or a cache name).")


def _resolve(table: Any, catalog: Catalog, item: dict[str, Any], sfn: Any) -> dict[str, Any]:
    if item.get("Status") != "restoring":
        return item
    outcome: dict[str, Any] = {}
    cache = catalog.find_cache(item["CacheName"])
    if cache is not None and cache.get("RestoreExecution") == item.get("ExecutionName"):
        if cache.get("Status") in FINAL:
            outcome = {"Status": cache["Status"], "FailureReason": cache.get("FailureReason")}
    else:
        # The restore never registered the cache (refused at preflight) or it was deleted since.
        try:
            desc = (sfn or client("stepfunctions")).describe_execution(executionArn=item["ExecutionArn"])
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") != "ExecutionDoesNotExist":
                raise
            # Its history is gone (the embedded AWS restarted; on AWS, 90 days passed).
            desc = {"status": "GONE"}
        if desc["status"] == "GONE":
            outcome = {
                "Status": "failed",
                "FailureReason": f"Interrupted: execution {item.get('ExecutionName')} no longer exists",
            }
        elif desc["status"] == "SUCCEEDED":
            outcome = {"Status": "available"}
        elif desc["status"] != "RUNNING":
            from cachevault.ops.control_plane import error_from_execution

            err = error_from_execution(desc)
            outcome = {"Status": "failed", "FailureReason": f"{err.code}: {err.message}"}
    if not outcome:
        return item
    outcome["CompleteTime"] = iso()
    fields = {k: v for k, v in outcome.items() if v is not None}
    try:
        table.update_item(
            Key={"ImportId": item["ImportId"]},
            UpdateExpression="SET " + ", ".join(f"#f{i} = :f{i}" for i in range(len(fields))),
            ExpressionAttributeNames={f"#f{i}": k for i, k in enumerate(fields)} | {"#st": "Status"},
            ExpressionAttributeValues={f":f{i}": v for i, v in enumerate(fields.values())}
            | {":restoring": "restoring"},
            ConditionExpression="#st = :restoring",
        )
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
            raise
    return {**item, **fields}
