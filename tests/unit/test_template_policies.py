"""IAM in template.yaml is scoped to named resources (checked on the SAM-expanded template).

The template is expanded by the SAM translator exactly as the local deployer expands it
(cachevault_tools.local.sam_translate), so SAM policy templates (DynamoDBCrudPolicy ...) are
checked as the statements they become and as the embedded AWS enforces them. A statement
whose resource is any bucket / any ARN (``*``) must be on the allow-list below, each with
the reason AWS or the feature leaves no narrower choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cachevault_tools.local.cfn_intrinsics import load_template
from cachevault_tools.local.sam_translate import translate

TEMPLATE = Path(__file__).resolve().parents[2] / "template.yaml"

# (role, first action) -> why a wildcard resource is unavoidable. Export buckets are not
# here: they come from the ExportBucketAllowList parameter (test_template_deployable.py).
WILDCARD_ALLOWED = {
    # Restore from an RDB the user names by S3 ARN (ElastiCache's SnapshotArns): read only.
    ("RestorePreflightFunctionRole", "s3:GetObject"): "restore: read the user's RDB (and its version)",
    ("RestoreLoadShardFunctionRole", "s3:GetObject"): "restore: stream the user's RDB (and its version) into the node",
    ("NodeTaskRole", "s3:GetObject"): "seeded restore: a node's seed streams the user's RDB to it",
}
# AWS managed policies SAM attaches: CloudWatch Logs (per-function log groups are created
# by Lambda on first write), X-Ray (PutTraceSegments has no resource-level permission) and,
# for functions with VpcConfig, the ENI permissions Lambda needs to place them in the VPC.
MANAGED_ALLOWED = {
    "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
    "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
    "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole",
}
CREDENTIAL_READERS = {
    "SnapshotPreflightFunctionRole",
    "SnapshotSelectSourcesFunctionRole",
    "CaptureStartFunctionRole",
    "RestorePreflightFunctionRole",
    "RestoreProvisionFunctionRole",
    "RestoreLoadShardFunctionRole",
    "RestoreAttachReplicasFunctionRole",
    "RestoreVerifyFunctionRole",
    "WorkerTaskRole",  # the ECS capture worker connects to the source node
}


def _text(value: Any) -> str:
    """A resource as text: Fn::Sub variables filled with their names, Refs as <Name>."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Ref" in value:
        return f"<{value['Ref']}>"
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        att = value["Fn::GetAtt"]
        return f"<{att[0] if isinstance(att, list) else att}>"
    if isinstance(value, dict) and "Fn::Sub" in value:
        sub = value["Fn::Sub"]
        template, names = (sub, {}) if isinstance(sub, str) else (sub[0], sub[1])
        for name, val in names.items():
            template = template.replace("${" + name + "}", _text(val))
        return template
    if isinstance(value, dict) and "Fn::If" in value:
        return " | ".join(_text(v) for v in value["Fn::If"][1:])
    if isinstance(value, dict) and "Fn::Join" in value:
        sep, parts = value["Fn::Join"]
        return sep.join(_text(v) for v in _listed(parts))
    if isinstance(value, dict) and "Fn::Split" in value:
        sep, source = value["Fn::Split"]
        return " | ".join(_text(source).split(sep))
    return str(value)


def _wildcard(resource: str) -> bool:
    if resource.strip() == "*":
        return True
    parts = resource.split(":", 5)
    # arn:partition:service:region:account:resource - a resource part starting with "*"
    # (any bucket, any function ...) is not scoped to a named resource.
    return len(parts) == 6 and parts[5].startswith("*")


@pytest.fixture(scope="module")
def expanded() -> dict[str, Any]:
    return translate(load_template(TEMPLATE), region="us-east-1").template


def _statements(resources: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(role logical id, statement) for inline role policies and AWS::IAM::Policy resources."""
    out: list[tuple[str, dict[str, Any]]] = []
    for lid, res in resources.items():
        props = res.get("Properties") or {}
        if res["Type"] == "AWS::IAM::Role":
            for policy in props.get("Policies") or []:
                out += [(lid, st) for st in policy["PolicyDocument"]["Statement"]]
        elif res["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            for role in props.get("Roles") or []:
                out += [(_text(role).strip("<>"), st) for st in props["PolicyDocument"]["Statement"]]
    return out


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_every_statement_names_its_resources(expanded: dict[str, Any]) -> None:
    statements = _statements(expanded["Resources"])
    assert len(statements) > 50  # the whole product was expanded, not an empty template
    offenders = []
    for role, st in statements:
        actions = _listed(st["Action"])
        assert "*" not in actions and not any(a.endswith(":*") for a in actions), (role, actions)
        if st["Effect"] != "Allow":
            continue
        wild = [r for r in map(_text, _listed(st["Resource"])) if _wildcard(r)]
        if wild and (role, actions[0]) not in WILDCARD_ALLOWED:
            offenders.append((role, actions, wild))
    assert offenders == []


def test_only_known_managed_policies(expanded: dict[str, Any]) -> None:
    attached = {
        arn
        for res in expanded["Resources"].values()
        if res["Type"] == "AWS::IAM::Role"
        for arn in (res["Properties"].get("ManagedPolicyArns") or [])
    }
    assert attached and attached <= MANAGED_ALLOWED


def test_secrets_are_read_only_by_the_steps_that_connect_to_nodes(expanded: dict[str, Any]) -> None:
    readers: dict[str, set[str]] = {}
    for role, st in _statements(expanded["Resources"]):
        for action in _listed(st["Action"]):
            if action in ("secretsmanager:GetSecretValue", "ssm:GetParameter"):
                readers.setdefault(action, set()).add(role)
                for resource in map(_text, _listed(st["Resource"])):
                    assert ":secret:cachevault/" in resource or ":parameter/cachevault/" in resource, resource
    assert readers["secretsmanager:GetSecretValue"] == CREDENTIAL_READERS
    assert readers["ssm:GetParameter"] == CREDENTIAL_READERS


def test_bucket_encrypted_private_and_tls_only() -> None:
    template = load_template(TEMPLATE)
    resources = template["Resources"]
    bucket = resources["SnapshotBucket"]["Properties"]
    rule = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    assert rule["SSEAlgorithm"] == {"Fn::If": ["UseKms", "aws:kms", "AES256"]}
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    policies = [r for r in resources.values() if r["Type"] == "AWS::S3::BucketPolicy"]
    denies = [
        st
        for p in policies
        if p["Properties"]["Bucket"] == {"Ref": "SnapshotBucket"}
        for st in p["Properties"]["PolicyDocument"]["Statement"]
        if st["Effect"] == "Deny"
    ]
    assert any(st["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} for st in denies)
    env = template["Globals"]["Function"]["Environment"]["Variables"]
    assert env["SNAPSHOT_ENCRYPTION"] == {"Ref": "SnapshotEncryption"}
    assert "SNAPSHOT_KMS_KEY_ID" in env
