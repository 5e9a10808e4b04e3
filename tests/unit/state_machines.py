"""The state machines of template.yaml as Step Functions receives them: DefinitionSubstitutions filled.

Each ``${Name}`` of a definition is replaced by what its substitution becomes on deploy
(``!GetAtt F.Arn`` -> a Lambda function ARN, ``!Ref X`` -> a name, ...), so validators and
simulations see the definition CloudFormation hands to Step Functions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cfnlint.decode import decode

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
ACCOUNT, REGION = "123456789012", "us-east-1"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


def _deployed_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        att = value["Fn::GetAtt"]
        resource, attribute = att if isinstance(att, list) else att.split(".", 1)
        if attribute == "Arn" and resource.endswith("Function"):
            return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:cachevault-{resource}"
        return f"arn:aws:cloudformation:{REGION}:{ACCOUNT}:{resource}/{attribute}"
    if isinstance(value, dict) and "Ref" in value:
        return f"cachevault-{value['Ref']}"
    if isinstance(value, dict) and "Fn::Sub" in value:
        sub = value["Fn::Sub"]
        text = sub if isinstance(sub, str) else sub[0]
        return (
            text.replace("${AWS::Region}", REGION)
            .replace("${AWS::AccountId}", ACCOUNT)
            .replace("${AWS::Partition}", "aws")
            .replace("${AWS::StackName}", "cachevault")
        )
    raise ValueError(f"no deployed value for substitution {value!r}")


def definitions() -> dict[str, dict[str, Any]]:
    """Logical id -> the definition with every substitution filled (fails on a missing one)."""
    template, matches = decode(str(TEMPLATE))
    assert not matches, matches
    out = {}
    for lid, res in template["Resources"].items():
        if res["Type"] != "AWS::Serverless::StateMachine":
            continue
        props = res["Properties"]
        text = (ROOT / props["DefinitionUri"]).read_text()
        values = {k: _deployed_value(v) for k, v in (props.get("DefinitionSubstitutions") or {}).items()}
        missing = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
        assert not missing, f"{lid}: no DefinitionSubstitutions for {missing}"
        out[lid] = json.loads(_PLACEHOLDER.sub(lambda m, filled=values: filled[m.group(1)], text))
    return out
