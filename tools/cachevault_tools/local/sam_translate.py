"""SAM -> CloudFormation with the real SAM translator (``aws-sam-translator``).

The translator is what ``sam deploy`` runs server-side (the ``AWS::Serverless-2016-10-31``
transform): Globals, policy templates, implicit roles, events, the implicit API. The
local deployer creates what it returns, so local roles and policies are CloudFormation's.

The translator accepts only S3 URIs for code and definitions; local paths (what
``sam build`` would upload) are rewritten to ``s3://<LOCAL_CODE_BUCKET>/<path>`` first
and mapped back to the directory by :func:`local_path`, as cfn-lint does for the same
reason (cfnlint/template/transforms/_sam.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

LOCAL_CODE_BUCKET = "cachevault-local-code"
SAM_TRANSFORM = "AWS::Serverless-2016-10-31"
_LOCAL_URI_KEYS = {
    "AWS::Serverless::Function": "CodeUri",
    "AWS::Serverless::LayerVersion": "ContentUri",
    "AWS::Serverless::StateMachine": "DefinitionUri",
}

_GLOBAL_URI_KEYS = {"Function": "CodeUri", "LayerVersion": "ContentUri", "StateMachine": "DefinitionUri"}


@dataclass
class Translated:
    """The CloudFormation template, plus where SAM resources and events went."""

    template: dict[str, Any]
    # translated logical id of a SAM event's resource (rule, schedule) -> (SAM resource, event id)
    events: dict[str, tuple[str, str]] = field(default_factory=dict)
    # translated logical id -> SAM logical id, where the translator renamed (layer versions)
    renamed: dict[str, str] = field(default_factory=dict)


def is_sam(template: Mapping[str, Any]) -> bool:
    transform = template.get("Transform")
    transforms = transform if isinstance(transform, list) else [transform]
    return SAM_TRANSFORM in transforms


def translate(
    template: dict[str, Any],
    *,
    region: str,
    parameter_values: Mapping[str, Any] | None = None,
    managed_policy_map: Callable[[], dict[str, str]] | None = None,
) -> Translated:
    """The template as CloudFormation (returned unchanged when it has no SAM transform)."""
    if not is_sam(template):
        return Translated(copy.deepcopy(template))
    from samtranslator.parser.parser import Parser
    from samtranslator.translator.translator import Translator

    sam = copy.deepcopy(template)
    events: dict[str, tuple[str, str]] = {}
    layers: dict[str, str] = {}
    for section, key in _GLOBAL_URI_KEYS.items():  # a CodeUri in Globals (every function's)
        props = (sam.get("Globals") or {}).get(section)
        if isinstance(props, dict) and isinstance(props.get(key), str) and not props[key].startswith("s3://"):
            props[key] = f"s3://{LOCAL_CODE_BUCKET}/{props[key]}"
    for lid, res in (sam.get("Resources") or {}).items():
        props = res.get("Properties")
        if not isinstance(props, dict):
            continue
        key = _LOCAL_URI_KEYS.get(str(res.get("Type")))
        if key and isinstance(props.get(key), str) and not props[key].startswith("s3://"):
            props[key] = f"s3://{LOCAL_CODE_BUCKET}/{props[key]}"
        for event_id in props.get("Events") or {}:
            events[f"{lid}{event_id}"] = (lid, str(event_id))
        if res.get("Type") == "AWS::Serverless::LayerVersion":
            layers[lid] = lid
    translator = Translator(
        managed_policy_map=None, sam_parser=Parser(), boto_session=boto3.Session(region_name=region)
    )
    out = translator.translate(
        sam_template=sam,
        parameter_values=dict(parameter_values or {}),
        get_managed_policy_map=managed_policy_map or dict,
        passthrough_metadata=True,
    )
    renamed: dict[str, str] = {}
    for lid, res in (out.get("Resources") or {}).items():
        if res.get("Type") == "AWS::Lambda::LayerVersion" and lid not in layers:
            # SAM suffixes layer versions with a content hash: <LogicalId><10 hex>
            base = lid[:-10]
            if base in layers:
                renamed[lid] = base
    return Translated(out, events={k: v for k, v in events.items() if k in out.get("Resources", {})}, renamed=renamed)


def local_path(location: Any, base: Path) -> Path | None:
    """The local directory/file behind a translated ``Code``/``Content``/``DefinitionS3Location``."""
    if not isinstance(location, dict):
        return None
    bucket = location.get("S3Bucket", location.get("Bucket"))
    key = location.get("S3Key", location.get("Key"))
    if bucket != LOCAL_CODE_BUCKET or not isinstance(key, str):
        return None
    return (base / key).resolve()


def aws_managed_policy_map(iam: Any) -> Callable[[], dict[str, str]]:
    """Name -> ARN of the AWS managed policies the (embedded) account has, read when needed."""

    def load() -> dict[str, str]:
        found: dict[str, str] = {}
        for page in iam.get_paginator("list_policies").paginate(Scope="AWS"):
            for policy in page["Policies"]:
                found[policy["PolicyName"]] = policy["Arn"]
        return found

    return load
