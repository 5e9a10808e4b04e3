"""Every state machine is valid Amazon States Language once its substitutions are filled.

Two independent validators: statelint (the awslabs statelint rules, Python port) and
cfn-lint's AWS::StepFunctions::StateMachine Definition schema (rule E3601 and friends) on
a template holding the substituted definitions inline, as CloudFormation would see them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cfnlint.api import ManualArgs, lint
from statelint.config import Config
from statelint.linter import Linter
from statelint.problem.problem_type import ProblemType

from tests.unit.state_machines import ACCOUNT, definitions

DEFINITIONS = definitions()
# statelint's FLOAT rule wants BackoffRate written 2.0; Step Functions takes any number >= 1.
STATELINT = Config(ignored_problem_types={ProblemType.FLOAT})


def test_every_state_machine_of_the_template_is_checked() -> None:
    assert set(DEFINITIONS) == {
        "CreateSnapshotStateMachine",
        "RestoreSnapshotStateMachine",
        "DeleteCacheStateMachine",
        "CopySnapshotStateMachine",
    }


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_statelint_finds_no_problem(name: str) -> None:
    assert Linter.validate(DEFINITIONS[name], STATELINT) == []


def test_statelint_does_report_a_broken_definition() -> None:
    broken: dict[str, Any] = json.loads(json.dumps(DEFINITIONS["CreateSnapshotStateMachine"]))
    broken["States"]["MarkAvailable"]["Next"] = "NoSuchState"
    assert any("NoSuchState" in p for p in Linter.validate(broken, STATELINT))


def test_cfn_lint_accepts_every_definition_inline() -> None:
    resources = {
        name: {
            "Type": "AWS::StepFunctions::StateMachine",
            "Properties": {"RoleArn": f"arn:aws:iam::{ACCOUNT}:role/sfn", "Definition": definition},
        }
        for name, definition in DEFINITIONS.items()
    }
    template = json.dumps({"AWSTemplateFormatVersion": "2010-09-09", "Resources": resources})
    matches = lint(template, config=ManualArgs(regions=["us-east-1"]))
    assert [str(m) for m in matches] == []
    # The same check does see a bad definition.
    resources["CreateSnapshotStateMachine"]["Properties"]["Definition"]["States"]["MarkFailed"]["Bogus"] = 1
    assert lint(json.dumps({"Resources": resources}), config=ManualArgs(regions=["us-east-1"]))
