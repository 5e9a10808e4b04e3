"""The HTTP API (API Gateway REST, Powertools ``APIGatewayRestResolver``): the CLI's verbs.

Routes mirror the CLI and ElastiCache's actions::

    POST   /snapshots               CreateSnapshot     202 {"Snapshot": {... "SnapshotStatus": "creating"}}
    GET    /snapshots               DescribeSnapshots  200 {"Snapshots": [...], "Marker"?}
    GET    /snapshots/{name}        DescribeSnapshots  200 {"Snapshot": {...}}
    DELETE /snapshots/{name}        DeleteSnapshot     200 {"Snapshot": {... "deleting"}}
    POST   /snapshots/{name}/copy   CopySnapshot       202 {"Snapshot": {... the copy or export}}
    POST   /restores                restore            202 {"ReplicationGroupId", "ExecutionArn", ...}

Errors are ``{"Error": {"Code", "Message", "Type"}, "RequestId"}`` with ElastiCache's
codes and status (404 for unknown names, 400 for bad requests and conflicts).

Create and restore answer once every check a request can fail synchronously has passed
(the same preflight rules the state machine runs, minus the node I/O), then start the
state machine and return: nothing is written for a refused request. They do not wait
for the state machine's own preflight: API Gateway cuts a request at 29 s. The execution ARN in the answer tracks it.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, TypeVar

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ValidationError

from cachevault.catalog import caches, storage
from cachevault.core import names, node_types
from cachevault.core.aws import client
from cachevault.core.errors import (
    CacheVaultError,
    InvalidParameterCombination,
    InvalidParameterValue,
    InvalidSnapshotState,
    ReplicationGroupAlreadyExistsFault,
    RequestEntityTooLarge,
    SnapshotAlreadyExistsFault,
)
from cachevault.core.handler import logger, metrics, tracer
from cachevault.core.settings import Settings
from cachevault.core.stack import StackInfo
from cachevault.nodes import credentials
from cachevault.ops import control_plane as service
from cachevault.ops import copy_steps as copy_workflow
from cachevault.ops.api_models import CopySnapshotRequest, CreateSnapshotRequest, ListSnapshotsQuery, RestoreRequest
from cachevault.snapshot import preflight

app = APIGatewayRestResolver()
M = TypeVar("M", bound=BaseModel)

# Every CreateSnapshot rule that needs no node I/O: what the state machine would refuse first.
SYNC_SNAPSHOT_RULES = tuple(rule for rule in preflight.RULES if rule is not preflight.memory_headroom)


def control_plane() -> service.ControlPlane:
    return service.ControlPlane(StackInfo.from_env(), Settings.from_env())


def _json(status: int, payload: dict[str, Any]) -> Response:
    return Response(
        status_code=status, content_type=content_types.APPLICATION_JSON, body=json.dumps(payload, default=str)
    )


MAX_BODY_BYTES = 10 * 1024 * 1024  # API Gateway's payload limit: larger requests never reach a function


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads hook: ``{"A": 1, "A": 2}`` is refused, not silently the last value."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidParameterValue(f"The request body gives the field {key!r} more than once.")
        result[key] = value
    return result


def _body_text(event: dict[str, Any]) -> str:
    body = event.get("body")
    if body is None:
        return ""
    if not isinstance(body, str):
        raise InvalidParameterValue("The request body must be JSON text.")
    if event.get("isBase64Encoded"):
        try:
            return base64.b64decode(body, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise InvalidParameterValue("The request body is not valid base64-encoded UTF-8.") from exc
    return body


def _body(model: type[M]) -> M:
    text = _body_text(app.current_event.raw_event)
    try:
        raw = json.loads(text, object_pairs_hook=_no_duplicate_keys) if text else None
    except RecursionError as exc:
        raise InvalidParameterValue("The request body nests arrays or objects too deeply.") from exc
    except ValueError as exc:  # json.JSONDecodeError
        raise InvalidParameterValue(f"The request body is not valid JSON: {exc}.") from exc
    if not isinstance(raw, dict):
        raise InvalidParameterValue("The request body must be a JSON object.")
    return parse(event=raw, model=model)


def _body_bytes(event: dict[str, Any]) -> int:
    body = event.get("body")
    if not isinstance(body, str):
        return 0
    if event.get("isBase64Encoded"):
        return len(body) * 3 // 4
    return len(body.encode("utf-8", errors="surrogatepass"))


def _early_refusal(event: Any) -> dict[str, Any] | None:
    """What API Gateway itself would refuse, answered before the resolver reads the event."""
    if not isinstance(event, dict) or not isinstance(event.get("httpMethod"), str):
        err: CacheVaultError = InvalidParameterValue(
            "The event is not an API Gateway REST proxy request (a JSON object with httpMethod, path, ...)."
        )
    elif _body_bytes(event) > MAX_BODY_BYTES:
        err = RequestEntityTooLarge(f"The request body is over {MAX_BODY_BYTES // (1024 * 1024)} MB.")
    else:
        return None
    logger.info("request refused", code=err.code, status=err.http_status, reason=err.message)
    return {
        "statusCode": err.http_status,
        "headers": {"Content-Type": content_types.APPLICATION_JSON},
        "body": json.dumps({"Error": {**err.to_dict(), "Type": "Sender"}}),
        "isBase64Encoded": False,
    }


def _validation_error(err: ValidationError) -> InvalidParameterValue:
    problems = []
    for item in err.errors():
        field = ".".join(str(p) for p in item.get("loc", ())) or "body"
        message = "is not a known parameter" if item.get("type") == "extra_forbidden" else item.get("msg", "")
        problems.append(f"{field}: {message}")
    return InvalidParameterValue("Invalid request: " + "; ".join(problems) + ".", Fields=problems)


@app.exception_handler(Exception)
def handle_error(exc: Exception) -> Response:
    """The one place an error becomes an HTTP answer."""
    if isinstance(exc, ValidationError):
        err: CacheVaultError = _validation_error(exc)
    elif isinstance(exc, CacheVaultError):
        err = exc
    else:
        # The details stay in the log: an answer never carries Python internals.
        logger.exception("unexpected error")
        request = app.lambda_context.aws_request_id if app.lambda_context else "unknown"
        err = CacheVaultError(f"The request could not be completed (internal error, request id {request}).")
    status = int(err.http_status)
    kind = "Sender" if status < 500 else "Receiver"
    metrics.add_metric(name=f"Api{'Client' if status < 500 else 'Server'}Errors", unit=MetricUnit.Count, value=1)
    logger.info("request refused", code=err.code, status=status, reason=err.message)
    request_id = app.lambda_context.aws_request_id if app.lambda_context else None
    return _json(status, {"Error": {**err.to_dict(), "Type": kind}, "RequestId": request_id})


@app.not_found
def not_found(_: Exception) -> Response:
    event = app.current_event
    return _json(
        404,
        {
            "Error": {
                "Code": "UnknownOperationException",
                "Message": f"No route for {event.http_method} {event.path}.",
                "Type": "Sender",
            }
        },
    )


# ---------------------------------------------------------------------------------- snapshots
@app.post("/snapshots")
def create_snapshot() -> Response:
    request = _body(CreateSnapshotRequest)
    control = control_plane()
    snapshot = names.snapshot_name(request.SnapshotName)  # "automatic." is reserved: refused here
    cache_name = names.cache_name(request.ReplicationGroupId)
    cache = control.catalog.get_cache(cache_name)
    preflight.run(
        preflight.PreflightContext(
            request=preflight.SnapshotRequest(
                snapshot_name=snapshot, cache_name=cache_name, source_node=request.SourceNode
            ),
            cache=cache,
            catalog=control.catalog,
        ),
        SYNC_SNAPSHOT_RULES,
    )
    execution = service.execution_name("snapshot", snapshot)
    arn = control.start(
        service.CREATE_SNAPSHOT,
        execution,
        {
            "SnapshotName": snapshot,
            "ReplicationGroupId": cache_name,
            "SnapshotSource": "manual",
            "SourceNode": request.SourceNode,
            "FinalSnapshot": False,
            "PollSeconds": 1,
        },
    )
    metrics.add_metric(name="ApiSnapshotsRequested", unit=MetricUnit.Count, value=1)
    return _json(
        202,
        {
            "Snapshot": {
                "SnapshotName": snapshot,
                "ReplicationGroupId": cache_name,
                "SnapshotStatus": "creating",
                "SnapshotSource": "manual",
                "CacheNodeType": cache.get("CacheNodeType"),
                "Engine": cache.get("Engine"),
                "EngineVersion": cache.get("EngineVersion"),
                "NumNodeGroups": cache.get("NumNodeGroups", 1),
                "ExecutionName": execution,
                "ExecutionArn": arn,
            }
        },
    )


@app.get("/snapshots")
def list_snapshots() -> Response:
    query = parse(event=dict(app.current_event.query_string_parameters or {}), model=ListSnapshotsQuery)
    page = control_plane().list_snapshots(
        cache=query.ReplicationGroupId,
        source=query.SnapshotSource,
        max_records=query.MaxRecords,
        marker=query.Marker,
    )
    return _json(200, page)


@app.get("/snapshots/<name>")
def describe_snapshot(name: str) -> Response:
    return _json(200, {"Snapshot": control_plane().describe_snapshot(name)})


@app.delete("/snapshots/<name>")
def delete_snapshot(name: str) -> Response:
    return _json(200, {"Snapshot": control_plane().delete_snapshot(name)})


@app.post("/snapshots/<name>/copy")
def copy_snapshot(name: str) -> Response:
    request = _body(CopySnapshotRequest)
    control = control_plane()
    source = control.catalog.get_snapshot(names.snapshot_name(name, automatic=True))
    target = names.snapshot_name(request.TargetSnapshotName)  # a copy is manual: "automatic." refused
    bucket = (request.TargetBucket or "").strip() or None
    if bucket:
        storage.check_bucket_name(bucket)
    if source["SnapshotStatus"] != "available":
        raise InvalidSnapshotState(
            f"Snapshot {source['SnapshotName']!r} is {source['SnapshotStatus']!r}; only an available "
            "snapshot can be copied."
        )
    if bucket:
        # The export refusals of CopySnapshot's preflight (data tiering, missing bucket, name taken).
        copy_workflow._check_export(client("s3"), source, target, bucket, len(source.get("NodeSnapshots", [])))
    elif target == source["SnapshotName"] or control.catalog.find_snapshot(target) is not None:
        raise SnapshotAlreadyExistsFault(f"Snapshot {target!r} already exists.")
    payload: dict[str, Any] = {"SourceSnapshotName": source["SnapshotName"], "TargetSnapshotName": target}
    if bucket:
        payload["TargetBucket"] = bucket
    execution = service.execution_name("copy", target)
    arn = control.start(service.ControlPlane.COPY_SNAPSHOT, execution, payload)
    return _json(
        202,
        {
            "Snapshot": {
                "SnapshotName": target,
                "SnapshotStatus": "creating" if not bucket else source["SnapshotStatus"],
                "SourceSnapshotName": source["SnapshotName"],
                "TargetBucket": bucket,
                "Mode": "export" if bucket else "copy",
                "ReplicationGroupId": source.get("ReplicationGroupId"),
                "ExecutionName": execution,
                "ExecutionArn": arn,
            }
        },
    )


# ---------------------------------------------------------------------------------- restore
@app.post("/restores")
def restore() -> Response:
    request = _body(RestoreRequest)
    control = control_plane()
    target = names.cache_name(request.ReplicationGroupId)
    payload = _check_restore(control, request, target)
    execution = service.execution_name("restore", target)
    arn = control.start(service.RESTORE_SNAPSHOT, execution, payload)
    metrics.add_metric(name="ApiRestoresRequested", unit=MetricUnit.Count, value=1)
    return _json(
        202,
        {
            "ReplicationGroupId": target,
            "Status": "creating",
            "SnapshotName": payload.get("SnapshotName"),
            "SnapshotArns": payload.get("SnapshotArns"),
            "ExecutionName": execution,
            "ExecutionArn": arn,
        },
    )


def _check_restore(control: service.ControlPlane, request: RestoreRequest, target: str) -> dict[str, Any]:
    """What RestoreSnapshot's preflight refuses before it stages anything; the payload to start it."""
    if bool(request.SnapshotName) == bool(request.SnapshotArns):
        raise InvalidParameterCombination("Give exactly one of SnapshotName or SnapshotArns.")
    existing = control.catalog.find_cache(target)
    # A failed earlier restore leaves only its record: its name may be taken again. A
    # registered external cache is a restore target (preflight checks it is empty).
    reusable = existing is not None and existing.get("Status") == "failed" and existing.get("Managed") != "external"
    if existing is not None and not reusable and existing.get("Managed") != "external":
        raise ReplicationGroupAlreadyExistsFault(f"Replication group {target!r} already exists.")
    payload: dict[str, Any] = {"ReplicationGroupId": target}
    source_cluster = False
    if request.SnapshotName:
        snapshot = control.catalog.get_snapshot(names.snapshot_name(request.SnapshotName, automatic=True))
        if snapshot["SnapshotStatus"] != "available":
            raise InvalidSnapshotState(
                f"Snapshot {snapshot['SnapshotName']!r} is {snapshot['SnapshotStatus']!r}; only an "
                "available snapshot can be restored."
            )
        source_cluster = bool(snapshot.get("ClusterMode"))
        payload["SnapshotName"] = snapshot["SnapshotName"]
    else:
        payload["SnapshotArns"] = list(request.SnapshotArns or [])
    if request.ClusterMode == "disabled" and source_cluster and not request.AllowClusterModeDisable:
        raise InvalidParameterCombination(
            "The snapshot is of a cluster-mode-enabled cache; restoring it with cluster mode disabled "
            "merges every shard into one node. Ask for it explicitly with AllowClusterModeDisable."
        )
    if request.CacheNodeType is not None:
        node_types.node_type(request.CacheNodeType)
    if request.ClusterMode is not None or request.NumNodeGroups is not None:
        if request.ClusterMode is None:  # as the state machine decides it
            cluster = source_cluster or (request.NumNodeGroups or 1) > 1
        else:
            cluster = request.ClusterMode == "enabled"
        caches.validate_shape(
            cluster_mode=cluster,
            num_shards=request.NumNodeGroups or 1,
            replicas=1 if request.ReplicasPerNodeGroup is None else request.ReplicasPerNodeGroup,
            kind="node-based",
        )
    for key in ("NumNodeGroups", "ReplicasPerNodeGroup", "CacheNodeType", "ClusterMode"):
        value = getattr(request, key)
        if value is not None:
            payload[key] = value
    if request.AllowClusterModeDisable:
        payload["AllowClusterModeDisable"] = True
    payload.update(
        credentials.security_fields(
            {k: getattr(request, k) for k in ("AuthSecretArn", "AuthParameterName", "AuthUsername")}
        )
    )
    return payload


# ---------------------------------------------------------------------------------- handler
@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST, clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: Any, context: LambdaContext) -> dict[str, Any]:
    refused = _early_refusal(event)
    if refused is not None:
        return refused
    return app.resolve(event, context)
