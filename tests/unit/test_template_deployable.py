"""template.yaml as a user deploys it (SAM-expanded): VPC, API auth, export scope, retention, names.

The template is expanded by the SAM translator (through cfn-lint, offline), so what is
checked is what CloudFormation receives from ``sam deploy``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cfnlint.decode import decode
from cfnlint.template.transforms._sam import Transform

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"

# Every function that opens a connection to a cache node (or stops one): they must run in
# the user's VPC to reach private nodes.
NODE_FACING = {
    "SnapshotPreflightFunction",
    "SnapshotSelectSourcesFunction",
    "CaptureStartFunction",
    "RestorePreflightFunction",
    "RestoreProvisionFunction",
    "RestoreLoadShardFunction",
    "RestoreAttachReplicasFunction",
    "RestoreVerifyFunction",
    "RestoreFailFunction",
    "DeleteCacheFinishFunction",
}
# Steps that end an operation and announce it on the event bus (events.publish).
EVENT_PUBLISHERS = {
    "SnapshotCompleteFunction",
    "SnapshotFailFunction",
    "RestoreCompleteFunction",
    "RestoreFailFunction",
    "SnapshotCopyCompleteFunction",
    "SnapshotCopyFailFunction",
    "S3ImportFunction",
}
EXPORT_ROLES = {
    "SnapshotCopyPreflightFunctionRole",
    "SnapshotCopyObjectFunctionRole",
    "SnapshotCopyFailFunctionRole",
    "ApiFunctionRole",
}
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "x-amazon-apigateway-any-method"}


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    template, matches = decode(str(TEMPLATE))
    assert not matches, matches
    return template


@pytest.fixture(scope="module")
def expanded() -> dict[str, Any]:
    saved = os.environ.get("AWS_DEFAULT_REGION")
    try:
        template, _ = decode(str(TEMPLATE))
        transform = Transform(str(TEMPLATE), template, "us-east-1")
        assert not transform.transform_template()
        return transform.template()
    finally:  # the SAM transform sets AWS_DEFAULT_REGION process-wide
        if saved is None:
            os.environ.pop("AWS_DEFAULT_REGION", None)
        else:
            os.environ["AWS_DEFAULT_REGION"] = saved


def _of_type(resources: dict[str, Any], rtype: str) -> dict[str, dict[str, Any]]:
    return {lid: res for lid, res in resources.items() if res["Type"] == rtype}


def _role_statements(resources: dict[str, Any], role: str) -> list[dict[str, Any]]:
    out = []
    for policy in resources[role]["Properties"].get("Policies") or []:
        out += policy["PolicyDocument"]["Statement"]
    for res in _of_type(resources, "AWS::IAM::Policy").values():
        if {"Ref": role} in res["Properties"]["Roles"]:
            out += res["Properties"]["PolicyDocument"]["Statement"]
    return out


def _actions(statement: dict[str, Any]) -> list[str]:
    action = statement["Action"]
    return action if isinstance(action, list) else [action]


def test_every_node_facing_function_runs_in_the_vpc_parameters(expanded: dict[str, Any]) -> None:
    functions = _of_type(expanded["Resources"], "AWS::Lambda::Function")
    assert set(functions) >= NODE_FACING
    in_vpc = {lid for lid, res in functions.items() if "VpcConfig" in res["Properties"]}
    assert in_vpc == NODE_FACING
    for lid in NODE_FACING:
        cond, config, otherwise = functions[lid]["Properties"]["VpcConfig"]["Fn::If"]
        assert cond == "UseVpc" and otherwise == {"Ref": "AWS::NoValue"}
        assert config == {"SubnetIds": {"Ref": "SubnetIds"}, "SecurityGroupIds": {"Ref": "SecurityGroupIds"}}
    no_subnets = {"Fn::Equals": [{"Fn::Join": ["", {"Ref": "SubnetIds"}]}, ""]}
    assert expanded["Conditions"]["UseVpc"] == {"Fn::Not": [no_subnets]}


def test_vpc_endpoints_cover_every_service_the_vpc_functions_call(expanded: dict[str, Any]) -> None:
    endpoints = _of_type(expanded["Resources"], "AWS::EC2::VPCEndpoint")
    services = {}
    for lid, res in endpoints.items():
        assert res["Condition"] in ("MakeVpcEndpoints", "MakeGatewayEndpoints"), lid
        name = res["Properties"]["ServiceName"]["Fn::Sub"].rsplit(".", 1)[1]
        services[name] = res["Properties"]["VpcEndpointType"]
    assert services == {
        "s3": "Gateway",
        "dynamodb": "Gateway",
        "secretsmanager": "Interface",
        "ssm": "Interface",
        "states": "Interface",
        "events": "Interface",
    }
    assert expanded["Parameters"]["CreateVpcEndpoints"]["Default"] == "false"  # else: a NAT path


def test_every_api_method_requires_sigv4(expanded: dict[str, Any]) -> None:
    api = expanded["Resources"]["ServerlessRestApi"]["Properties"]["Body"]
    methods = [
        (path, verb, op) for path, ops in api["paths"].items() for verb, op in ops.items() if verb in HTTP_METHODS
    ]
    assert len(methods) >= 6  # the whole route table, not an empty API
    for path, verb, op in methods:
        assert op.get("security") == [{"AWS_IAM": []}], (path, verb)
        # InvokeRole NONE: API Gateway invokes with the function's resource policy, not the caller's rights.
        assert "credentials" not in op["x-amazon-apigateway-integration"], (path, verb)
    scheme = api["securityDefinitions"]["AWS_IAM"]
    assert scheme["x-amazon-apigateway-authtype"] == "awsSigv4"
    routes = _of_type(expanded["Resources"], "AWS::ApiGateway::RestApi")
    assert set(routes) == {"ServerlessRestApi"}


# The restore steps that read an RDB the user names by ARN (test_template_policies.WILDCARD_ALLOWED).
RESTORE_SOURCE_READERS = {"RestorePreflightFunctionRole", "RestoreLoadShardFunctionRole", "NodeTaskRole"}


def test_export_reaches_only_the_allow_listed_buckets(expanded: dict[str, Any]) -> None:
    resources = expanded["Resources"]
    for role in _of_type(resources, "AWS::IAM::Role"):
        for st in _role_statements(resources, role):
            if not any(a.startswith("s3:") for a in _actions(st)):
                continue
            resource = str(st["Resource"])
            if role in RESTORE_SOURCE_READERS and set(_actions(st)) <= {"s3:GetObject", "s3:GetObjectVersion"}:
                continue  # reads the RDB a user names by S3 ARN (SnapshotArns): any bucket, read only
            assert "arn:aws:s3:::*" not in resource, (role, st)
            assert (
                "SnapshotBucket" in resource
                or "ExportBucketAllowList" in resource
                or (
                    "snapshots-${AWS::AccountId}" in resource  # S3ImportFunction: the bucket by name
                )
            ), (role, st)
            if "ExportBucketAllowList" in resource:
                assert role in EXPORT_ROLES, role
    for lid in ("ExportBucketCheckPolicy", "ExportBucketWritePolicy", "ExportBucketCleanupPolicy"):
        assert resources[lid]["Condition"] == "HasExportBuckets"
    writes = [a for st in _role_statements(resources, "SnapshotCopyObjectFunctionRole") for a in _actions(st)]
    assert "s3:PutObject" in writes
    fn_env = resources["SnapshotCopyObjectFunction"]["Properties"]["Environment"]["Variables"]
    assert fn_env["EXPORT_BUCKET_ALLOW_LIST"] == {"Fn::Join": [",", {"Ref": "ExportBucketAllowList"}]}
    assert "EXPORT_BUCKET_OWNER" in fn_env
    assert expanded["Parameters"]["ExportBucketAllowList"]["Default"] == ""  # export off until named


def test_terminal_steps_may_publish_their_status_events(expanded: dict[str, Any]) -> None:
    resources = expanded["Resources"]
    for function in EVENT_PUBLISHERS:
        actions = {a for st in _role_statements(resources, f"{function}Role") for a in _actions(st)}
        assert "events:PutEvents" in actions, function


def test_delete_cache_finish_may_remove_the_automatic_snapshots(expanded: dict[str, Any]) -> None:
    resources = expanded["Resources"]
    statements = _role_statements(resources, "DeleteCacheFinishFunctionRole")
    by_action: dict[str, list[str]] = {}
    for st in statements:
        for action in _actions(st):
            by_action.setdefault(action, []).append(str(st["Resource"]))
    assert any("SnapshotsTable" in r for r in by_action["dynamodb:DeleteItem"])
    assert any("SnapshotsTable" in r for r in by_action["dynamodb:UpdateItem"])
    assert any("SnapshotBucket" in r for r in by_action["s3:DeleteObject"])
    assert any("SnapshotBucket" in r for r in by_action["s3:ListBucket"])
    assert all(":secret:cachevault/*" in r for r in by_action["secretsmanager:DeleteSecret"])


def test_bucket_and_tables_are_retained(raw: dict[str, Any]) -> None:
    stores = [
        lid for lid, res in raw["Resources"].items() if res["Type"] in ("AWS::S3::Bucket", "AWS::DynamoDB::Table")
    ]
    assert "SnapshotBucket" in stores and len(stores) >= 6
    for lid in stores:
        res = raw["Resources"][lid]
        assert res.get("DeletionPolicy") == "Retain" and res.get("UpdateReplacePolicy") == "Retain", lid


def test_physical_names_are_unique_per_stack(raw: dict[str, Any]) -> None:
    name_keys = {
        "AWS::S3::Bucket": "BucketName",
        "AWS::DynamoDB::Table": "TableName",
        "AWS::Events::EventBus": "Name",
        "AWS::Serverless::LayerVersion": "LayerName",
        "AWS::Serverless::StateMachine": "Name",
    }
    named = 0
    for lid, res in raw["Resources"].items():
        key = name_keys.get(res["Type"])
        if key is None or key not in res["Properties"]:
            continue
        named += 1
        assert "${AWS::StackName}" in str(res["Properties"][key]), (lid, res["Properties"][key])
    assert named >= 13


def test_samconfig_deploys_as_the_readme_says() -> None:
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    default = config["default"]
    assert default["global"]["parameters"]["stack_name"] == "cachevault"
    assert default["global"]["parameters"]["region"]
    deploy = default["deploy"]["parameters"]
    assert deploy["capabilities"] == "CAPABILITY_IAM"
    assert deploy["resolve_s3"] is True
    assert default["validate"]["parameters"]["lint"] is True
