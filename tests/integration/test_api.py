"""The HTTP API through the embedded AWS: the deployed ApiFunction invoked with API Gateway
proxy events (``lambda invoke``, as API Gateway calls it), real state machines, real
redis-server caches. Every refused request is checked for leaving nothing behind.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cachevault.catalog import storage
from cachevault.core.aws import client

from tests.product_fixtures import Product, fill, sync_replicas, wait_until

API_FUNCTION = "ApiFunction"


def proxy_event(
    method: str,
    path: str,
    *,
    body: Any = None,
    raw_body: str | None = None,
    query: dict[str, str] | None = None,
    resource: str | None = None,
    path_parameters: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An API Gateway REST (v1) proxy event, as the ServerlessRestApi sends it."""
    text = raw_body if raw_body is not None else (None if body is None else json.dumps(body))
    return {
        "resource": resource or path,
        "path": path,
        "httpMethod": method,
        "headers": {"Content-Type": "application/json", "Host": "cvlocalapi.execute-api.us-east-1.amazonaws.com"},
        "multiValueHeaders": {},
        "queryStringParameters": query,
        "multiValueQueryStringParameters": {k: [v] for k, v in query.items()} if query else None,
        "pathParameters": path_parameters,
        "stageVariables": None,
        "requestContext": {
            "resourcePath": resource or path,
            "httpMethod": method,
            "path": f"/Prod{path}",
            "stage": "Prod",
            "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
            "accountId": "123456789012",
            "apiId": "cvlocalapi",
            "identity": {"sourceIp": "127.0.0.1", "userAgent": "pytest"},
        },
        "body": text,
        "isBase64Encoded": False,
    }


def call(product: Product, event: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Invoke the deployed ApiFunction; (HTTP status, decoded JSON body)."""
    name = product.env.deployed.function_name(API_FUNCTION)
    response = client("lambda").invoke(FunctionName=name, Payload=json.dumps(event).encode())
    payload = json.loads(response["Payload"].read())
    assert "FunctionError" not in response, payload  # errors are HTTP answers, never crashes
    return payload["statusCode"], json.loads(payload["body"])


def api(product: Product, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    return call(product, proxy_event(method, path, **kwargs))


def error_code(body: dict[str, Any]) -> str:
    return body["Error"]["Code"]


def wait_snapshot(product: Product, name: str) -> dict[str, Any]:
    """A 202 means started: the record appears when the state machine's preflight made it."""
    wait_until(lambda: product.control.catalog.find_snapshot(name), 30, f"the record of {name}")
    return product.control.wait_snapshot(name, timeout_s=60)


def running_executions(product: Product) -> list[str]:
    """Executions of any of the stack's state machines still running."""
    sfn = product.control.sfn
    return [
        e["name"]
        for arn in product.control.stack.state_machines.values()
        for e in sfn.list_executions(stateMachineArn=arn, statusFilter="RUNNING")["executions"]
    ]


def state_of_world(product: Product) -> dict[str, Any]:
    """Everything a refused request must leave untouched."""
    sfn = product.control.sfn
    executions = {
        arn: [e["name"] for e in sfn.list_executions(stateMachineArn=arn)["executions"]]
        for arn in product.control.stack.state_machines.values()
    }
    return {
        "snapshots": sorted(
            (s["SnapshotName"], s["SnapshotStatus"]) for s in product.control.catalog.all_snapshots()
        ),
        "caches": sorted(
            (c["CacheName"], c.get("Status"), c.get("LockedBy")) for c in product.control.catalog.list_caches()
        ),
        "objects": product.s3_keys(),
        "executions": executions,
    }


@pytest.fixture(scope="module")
def source(product: Product) -> dict[str, Any]:
    """A cache with data and one available snapshot of it, made through the API itself."""
    from cachevault.catalog import caches

    cache = caches.create_local_cache("api-src", replicas=1, settings=product.settings)
    fill(cache["Endpoints"][0], keys=300, seed=7)
    sync_replicas(cache["Endpoints"][0], 1)
    body = {"ReplicationGroupId": "api-src", "SnapshotName": "API-Snap"}
    status, body = api(product, "POST", "/snapshots", body=body)
    assert status == 202, body
    assert body["Snapshot"]["SnapshotName"] == "api-snap"
    assert body["Snapshot"]["SnapshotStatus"] == "creating"
    assert body["Snapshot"]["ExecutionArn"].startswith("arn:aws:states:")
    record = wait_snapshot(product, "api-snap")
    assert record["SnapshotStatus"] == "available"
    assert record["ExecutionName"] == body["Snapshot"]["ExecutionName"]
    return cache


# ------------------------------------------------------------------------------ success paths
def test_describe_and_list(product: Product, source: dict[str, Any]) -> None:
    status, body = api(product, "GET", "/snapshots/api-snap", resource="/snapshots/{name}")
    assert status == 200
    snap = body["Snapshot"]
    assert snap["SnapshotStatus"] == "available"
    assert snap["ReplicationGroupId"] == "api-src"
    assert snap["NodeSnapshots"][0]["SourceRole"] == "replica"
    assert int(snap["CacheSize"]) > 0

    status, body = api(product, "GET", "/snapshots", query={"ReplicationGroupId": "api-src", "MaxRecords": "20"})
    assert status == 200
    assert [s["SnapshotName"] for s in body["Snapshots"]] == ["api-snap"]
    status, body = api(product, "GET", "/snapshots", query={"SnapshotSource": "automated"})
    assert status == 200
    assert all(s["SnapshotSource"] == "automated" for s in body["Snapshots"])
    assert "api-snap" not in [s["SnapshotName"] for s in body["Snapshots"]]


def test_restore_route_restores_the_data(product: Product, source: dict[str, Any]) -> None:
    status, body = api(
        product,
        "POST",
        "/restores",
        body={"SnapshotName": "api-snap", "ReplicationGroupId": "api-dst", "ReplicasPerNodeGroup": 0},
    )
    assert status == 202, body
    assert body["ReplicationGroupId"] == "api-dst"
    arn = body["ExecutionArn"]
    result = product.control.wait_restore(arn, "api-dst", timeout_s=90)
    assert result["Status"] == "available"
    assert result["Verification"]["Mismatches"] == []
    restored = product.control.catalog.get_cache("api-dst")
    assert restored["Status"] == "available"
    assert result["Verification"]["KeysExpected"] == 300
    from cachevault.catalog import caches

    caches.delete_local_cache("api-dst", product.settings)


def test_create_then_delete_removes_record_and_objects(product: Product, source: dict[str, Any]) -> None:
    status, body = api(product, "POST", "/snapshots", body={"ReplicationGroupId": "api-src", "SnapshotName": "api-tmp"})
    assert status == 202, body
    wait_snapshot(product, "api-tmp")
    prefix = storage.snapshot_prefix("api-tmp")
    assert any(k.endswith("api-tmp-0001.rdb") for k in product.s3_keys(prefix))

    status, body = api(product, "DELETE", "/snapshots/api-tmp", resource="/snapshots/{name}")
    assert status == 200, body
    assert body["Snapshot"]["SnapshotStatus"] == "deleting"
    assert product.control.catalog.find_snapshot("api-tmp") is None
    assert product.s3_keys(prefix) == []
    status, body = api(product, "GET", "/snapshots/api-tmp", resource="/snapshots/{name}")
    assert (status, error_code(body)) == (404, "SnapshotNotFoundFault")


def test_copy_route(product: Product, source: dict[str, Any]) -> None:
    status, body = api(
        product, "POST", "/snapshots/api-snap/copy", resource="/snapshots/{name}/copy",
        body={"TargetSnapshotName": "api-snap-copy"},
    )
    assert status in (200, 202), body
    assert body["Snapshot"]["SnapshotName"] == "api-snap-copy"
    copied = wait_until(
        lambda: (r := product.control.catalog.find_snapshot("api-snap-copy")) and r["SnapshotStatus"] == "available",
        60,
        "the copy to become available",
    )
    assert copied
    assert product.s3_keys(storage.snapshot_prefix("api-snap-copy"))
    # The copy ends with its execution: the target is marked available first, then the source
    # is handed back (copy_steps.complete_step). The refusal cases below compare the whole
    # catalog before and after a request, so the source must be back before they start.
    wait_until(lambda: not running_executions(product), 60, "the copy's execution to end")
    source_record = product.control.catalog.get_snapshot("api-snap")
    assert source_record["SnapshotStatus"] == "available" and not source_record.get("CopyExecution"), source_record


# ------------------------------------------------------------------------------ refusals
REFUSALS = [
    pytest.param(
        dict(method="POST", path="/snapshots", raw_body='{"ReplicationGroupId": "api-src", '),
        400, "InvalidParameterValueException", id="bad-json",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots", raw_body='["api-src"]'),
        400, "InvalidParameterValueException", id="not-an-object",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots", body={"ReplicationGroupId": "api-src"}),
        400, "InvalidParameterValueException", id="missing-snapshot-name",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots",
             body={"ReplicationGroupId": "api-src", "SnapshotName": "x1", "Extra": 1}),
        400, "InvalidParameterValueException", id="unknown-field",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots", body={"ReplicationGroupId": "api-src", "SnapshotName": "bad--name"}),
        400, "InvalidParameterValueException", id="invalid-name",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots", body={"ReplicationGroupId": "api-src", "SnapshotName": 7}),
        400, "InvalidParameterValueException", id="wrong-type",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots", body={"ReplicationGroupId": "no-such-cache", "SnapshotName": "x2"}),
        404, "ReplicationGroupNotFoundFault", id="unknown-cache",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots", body={"ReplicationGroupId": "api-src", "SnapshotName": "API-SNAP"}),
        400, "SnapshotAlreadyExistsFault", id="duplicate-snapshot",
    ),
    pytest.param(
        dict(method="GET", path="/snapshots/nope", resource="/snapshots/{name}"),
        404, "SnapshotNotFoundFault", id="describe-unknown",
    ),
    pytest.param(
        dict(method="DELETE", path="/snapshots/nope", resource="/snapshots/{name}"),
        404, "SnapshotNotFoundFault", id="delete-unknown",
    ),
    pytest.param(
        dict(method="GET", path="/snapshots", query={"MaxRecords": "5"}),
        400, "InvalidParameterValueException", id="list-max-records",
    ),
    pytest.param(
        dict(method="GET", path="/snapshots", query={"SnapshotSource": "sometimes"}),
        400, "InvalidParameterValueException", id="list-bad-source",
    ),
    pytest.param(
        dict(method="POST", path="/restores", body={"SnapshotName": "nope", "ReplicationGroupId": "api-new"}),
        404, "SnapshotNotFoundFault", id="restore-unknown-snapshot",
    ),
    pytest.param(
        dict(method="POST", path="/restores", body={"SnapshotName": "api-snap", "ReplicationGroupId": "api-src"}),
        400, "ReplicationGroupAlreadyExistsFault", id="restore-target-exists",
    ),
    pytest.param(
        dict(method="POST", path="/restores", body={"ReplicationGroupId": "api-new"}),
        400, "InvalidParameterCombinationException", id="restore-no-source",
    ),
    pytest.param(
        dict(method="POST", path="/restores", body={"SnapshotName": "api-snap", "ReplicationGroupId": "api-new",
                                                  "NumNodeGroups": 3, "ClusterMode": "disabled"}),
        400, "InvalidParameterCombinationException", id="restore-shards-without-cluster",
    ),
    pytest.param(
        dict(method="POST", path="/restores", body={"SnapshotName": "api-snap", "ReplicationGroupId": "api-new",
                                                  "NumNodeGroups": "2"}),
        400, "InvalidParameterValueException", id="restore-string-number",
    ),
    pytest.param(
        dict(method="POST", path="/restores", body={"SnapshotName": "api-snap", "ReplicationGroupId": "api-new",
                                                  "AuthToken": "s3cret-inline"}),
        400, "InvalidParameterValueException", id="restore-inline-secret",
    ),
    pytest.param(
        dict(method="POST", path="/restores", body={"SnapshotName": "api-snap", "ReplicationGroupId": "api-new",
                                                  "AuthSecretArn": "arn:aws:secretsmanager:us-east-1:1:secret:x",
                                                  "AuthParameterName": "/cachevault/x"}),
        400, "InvalidParameterValueException", id="restore-two-credential-sources",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots/nope/copy", resource="/snapshots/{name}/copy", body={}),
        400, "InvalidParameterValueException", id="copy-missing-target",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots/nope/copy", resource="/snapshots/{name}/copy",
             body={"TargetSnapshotName": "api-x"}),
        404, "SnapshotNotFoundFault", id="copy-unknown-source",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots/api-snap/copy", resource="/snapshots/{name}/copy",
             body={"TargetSnapshotName": "api-snap"}),
        400, "SnapshotAlreadyExistsFault", id="copy-onto-itself",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots/api-snap/copy", resource="/snapshots/{name}/copy",
             body={"TargetSnapshotName": "api-export", "TargetBucket": "no-such-bucket-here"}),
        400, "InvalidParameterValueException", id="export-missing-bucket",
    ),
    pytest.param(
        dict(method="PUT", path="/caches"),
        404, "UnknownOperationException", id="unknown-route",
    ),
    # Issue 12's bad inputs: each a 4xx with ElastiCache's code, none a 500.
    pytest.param(
        dict(method="POST", path="/restores", body={"SnapshotName": "api-snap", "ReplicationGroupId": "api-new",
                                                  "NumNodeGroups": 0, "ClusterMode": "enabled"}),
        400, "InvalidParameterValueException", id="restore-zero-shards",
    ),
    pytest.param(
        dict(method="POST", path="/restores", body={"SnapshotName": "api-snap", "ReplicationGroupId": "api-new",
                                                  "NumNodeGroups": 501, "ClusterMode": "enabled"}),
        400, "InvalidParameterValueException", id="restore-501-shards",
    ),
    pytest.param(
        dict(method="POST", path="/restores", body={"SnapshotName": "api-snap", "ReplicationGroupId": "api-new",
                                                  "ReplicasPerNodeGroup": 6}),
        400, "InvalidParameterValueException", id="restore-six-replicas",
    ),
    pytest.param(
        dict(method="POST", path="/restores", body={"SnapshotName": "api-snap", "ReplicationGroupId": "api-new",
                                                  "ReplicasPerNodeGroup": -1}),
        400, "InvalidParameterValueException", id="restore-negative-replicas",
    ),
    pytest.param(
        dict(method="POST", path="/restores", body={"SnapshotName": "api-snap", "ReplicationGroupId": "api-new",
                                                  "CacheNodeType": "bogus"}),
        400, "InvalidParameterValueException", id="restore-bogus-node-type",
    ),
    pytest.param(
        dict(method="POST", path="/restores", body={"SnapshotName": "api-snap", "ReplicationGroupId": "api-new",
                                                  "CacheNodeType": ""}),
        400, "InvalidParameterValueException", id="restore-empty-node-type",
    ),
    pytest.param(
        dict(method="POST", path="/restores", body={"SnapshotName": "api-snap", "ReplicationGroupId": "api-new",
                                                  "CacheNodeType": "cache.r7g.huge"}),
        400, "InvalidParameterValueException", id="restore-unknown-node-size",
    ),
    pytest.param(
        dict(method="POST", path="/restores", body={"SnapshotName": "api-snap", "ReplicationGroupId": "\u212aelvin"}),
        400, "InvalidParameterValueException", id="restore-kelvin-sign-name",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots", body={"ReplicationGroupId": "api-src", "SnapshotName": "\u212a-snap"}),
        400, "InvalidParameterValueException", id="snapshot-kelvin-sign-name",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots", raw_body='{"ReplicationGroupId": "api-src", "SnapshotName": "dup1", '
                                                        '"SnapshotName": "dup2"}'),
        400, "InvalidParameterValueException", id="duplicate-keys",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots", raw_body="[" * 100_000 + "]" * 100_000),
        400, "InvalidParameterValueException", id="100k-deep-array",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots/api-snap/copy", resource="/snapshots/{name}/copy",
             body={"TargetSnapshotName": "api-evil", "TargetBucket": "../evil"}),
        400, "InvalidParameterValueException", id="export-bucket-path",
    ),
    pytest.param(
        dict(method="POST", path="/snapshots", raw_body=json.dumps(
            {"ReplicationGroupId": "api-src", "SnapshotName": "big", "Pad": "x" * (10 * 1024 * 1024)})),
        413, "RequestEntityTooLarge", id="body-over-10mb",
    ),
]


@pytest.mark.parametrize(("request_args", "status", "code"), REFUSALS)
def test_refused_requests_change_nothing(
    product: Product, source: dict[str, Any], request_args: dict[str, Any], status: int, code: str
) -> None:
    # An operation an earlier case started may still be in its last steps (a record says
    # `available` before its execution ends): compare a world at rest.
    wait_until(lambda: not running_executions(product), 60, "earlier operations to end")
    before = state_of_world(product)
    got_status, body = call(product, proxy_event(**request_args))
    assert (got_status, error_code(body)) == (status, code), body
    assert body["Error"]["Message"]
    assert body["Error"]["Type"] == "Sender"
    assert "Traceback" not in body["Error"]["Message"] and "Error:" not in body["Error"]["Message"]
    assert state_of_world(product) == before


@pytest.mark.parametrize(
    "event",
    [
        pytest.param([{"httpMethod": "POST", "path": "/snapshots"}], id="json-array-event"),
        pytest.param("POST /snapshots", id="string-event"),
        pytest.param({"path": "/snapshots"}, id="no-http-method"),
    ],
)
def test_events_that_are_not_proxy_requests_are_refused(product: Product, source: dict[str, Any], event: Any) -> None:
    before = state_of_world(product)
    got_status, body = call(product, event)
    assert got_status == 400 and error_code(body) == "InvalidParameterValueException", body
    assert "API Gateway REST proxy request" in body["Error"]["Message"]
    assert state_of_world(product) == before


def test_busy_cache_is_refused_with_elasticache_state_error(product: Product, source: dict[str, Any]) -> None:
    catalog = product.control.catalog
    catalog.lock_cache("api-src", owner="someone-else", operation="snapshot")
    try:
        before = state_of_world(product)
        status, body = api(product, "POST", "/snapshots", body={"ReplicationGroupId": "api-src", "SnapshotName": "x3"})
        assert (status, error_code(body)) == (400, "InvalidReplicationGroupStateFault")
        assert state_of_world(product) == before
    finally:
        catalog.unlock_cache("api-src", owner="someone-else")


def test_execution_arn_from_environment_names_the_stack_machines(product: Product) -> None:
    env = product.env.deployed.functions[API_FUNCTION].env
    assert env["CREATE_SNAPSHOT_STATE_MACHINE_ARN"] == product.control.stack.state_machine("CreateSnapshotStateMachine")
    assert env["RESTORE_SNAPSHOT_STATE_MACHINE_ARN"] == product.control.stack.state_machine(
        "RestoreSnapshotStateMachine"
    )
    routes = {(r.method, r.path) for r in product.env.deployed.routes if r.function_logical_id == API_FUNCTION}
    assert routes == {
        ("POST", "/snapshots"),
        ("GET", "/snapshots"),
        ("GET", "/snapshots/{name}"),
        ("DELETE", "/snapshots/{name}"),
        ("POST", "/snapshots/{name}/copy"),
        ("POST", "/restores"),
    }
