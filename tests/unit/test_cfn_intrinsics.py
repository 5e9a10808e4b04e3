"""CloudFormation short-form YAML and intrinsic resolution, as the local deployer uses it."""

from __future__ import annotations

import pytest
from cachevault_tools.local.cfn_intrinsics import (
    NO_VALUE,
    Context,
    IntrinsicError,
    evaluate_conditions,
    loads_template,
    references,
    resolve,
    resolve_parameters,
)

TEMPLATE = """
Parameters:
  Stage: {Type: String, Default: dev, AllowedValues: [dev, prod]}
  Shards: {Type: CommaDelimitedList, Default: "a, b ,c"}
  Port: {Type: Number, Default: 6379}
Conditions:
  IsProd: !Equals [!Ref Stage, prod]
  NotProd: !Not [!Condition IsProd]
  Both: !And [!Condition NotProd, !Equals [!Ref Port, "6379"]]
Resources:
  Fn:
    Type: AWS::Serverless::Function
    Properties:
      Name: !Sub "${AWS::StackName}-fn-${Stage}"
      Arn: !GetAtt Table.Arn
      Long: !GetAtt [Table, StreamArn]
      Joined: !Join ["/", [!Ref Stage, !Select [1, !Ref Shards], !Ref "AWS::Region"]]
      Split: !Select [2, !Split [",", "x,y,z"]]
      Maybe: !If [IsProd, big, !Ref "AWS::NoValue"]
      Pick: !If [IsProd, 3, 1]
      Vars: !Sub
        - "${Prefix}.${Table}:${Table.Arn}:${!Literal}"
        - {Prefix: !Ref Stage}
      Json: '{"k": 1}'
      List: [one, !If [IsProd, two, !Ref "AWS::NoValue"], three]
"""


def ctx_for(overrides: dict[str, str] | None = None) -> tuple[dict, Context]:
    template = loads_template(TEMPLATE)
    ctx = Context(region="eu-west-1", account_id="111122223333", stack_name="cv")
    ctx.parameters = resolve_parameters(template["Parameters"], overrides)
    evaluate_conditions(template["Conditions"], ctx)
    ctx.refs["Table"] = "cv-table"
    ctx.attrs[("Table", "Arn")] = "arn:aws:dynamodb:eu-west-1:111122223333:table/cv-table"
    ctx.attrs[("Table", "StreamArn")] = "arn:stream"
    return template, ctx


def test_short_form_tags_load_as_long_form() -> None:
    template = loads_template(TEMPLATE)
    props = template["Resources"]["Fn"]["Properties"]
    assert props["Arn"] == {"Fn::GetAtt": ["Table", "Arn"]}
    assert props["Long"] == {"Fn::GetAtt": ["Table", "StreamArn"]}
    assert props["Name"] == {"Fn::Sub": "${AWS::StackName}-fn-${Stage}"}
    assert template["Conditions"]["NotProd"] == {"Fn::Not": [{"Condition": "IsProd"}]}


def test_resolution_with_defaults() -> None:
    template, ctx = ctx_for()
    props = resolve(template["Resources"]["Fn"]["Properties"], ctx)
    assert props == {
        "Name": "cv-fn-dev",
        "Arn": "arn:aws:dynamodb:eu-west-1:111122223333:table/cv-table",
        "Long": "arn:stream",
        "Joined": "dev/b/eu-west-1",
        "Split": "z",
        # Maybe: AWS::NoValue removes the key
        "Pick": 1,
        "Vars": "dev.cv-table:arn:aws:dynamodb:eu-west-1:111122223333:table/cv-table:${Literal}",
        "Json": '{"k": 1}',
        "List": ["one", "three"],
    }
    assert ctx.conditions == {"IsProd": False, "NotProd": True, "Both": True}


def test_resolution_with_overrides() -> None:
    template, ctx = ctx_for({"Stage": "prod"})
    props = resolve(template["Resources"]["Fn"]["Properties"], ctx)
    assert props["Maybe"] == "big"
    assert props["Pick"] == 3
    assert props["List"] == ["one", "two", "three"]
    assert ctx.conditions["Both"] is False


def test_pseudo_parameters() -> None:
    ctx = Context(region="us-west-2", account_id="999", stack_name="s")
    got = resolve({"Fn::Sub": "${AWS::Region}|${AWS::AccountId}|${AWS::StackName}|${AWS::Partition}"}, ctx)
    assert got == "us-west-2|999|s|aws"
    assert resolve({"Ref": "AWS::NoValue"}, ctx) is NO_VALUE
    assert resolve({"Fn::Sub": "${AWS::StackId}"}, ctx).startswith("arn:aws:cloudformation:us-west-2:999:stack/s/")


def test_parameters_validate_and_convert() -> None:
    declared = loads_template(TEMPLATE)["Parameters"]
    values = resolve_parameters(declared, {"Port": 7000})
    assert values == {"Stage": "dev", "Shards": ["a", "b", "c"], "Port": "7000"}
    with pytest.raises(IntrinsicError, match="not one of"):
        resolve_parameters(declared, {"Stage": "qa"})
    with pytest.raises(IntrinsicError, match="unknown template parameters"):
        resolve_parameters(declared, {"Nope": "1"})
    with pytest.raises(IntrinsicError, match="no Default"):
        resolve_parameters({"Required": {"Type": "String"}})


def test_unresolvable_constructs_raise_naming_them() -> None:
    ctx = Context()
    with pytest.raises(IntrinsicError, match="Missing"):
        resolve({"Ref": "Missing"}, ctx)
    with pytest.raises(IntrinsicError, match="Fn::ImportValue"):
        resolve({"Fn::ImportValue": "x"}, ctx)
    with pytest.raises(IntrinsicError, match=r"Res\.Attr"):
        resolve({"Fn::Sub": "${Res.Attr}"}, ctx)


def test_references_finds_every_dependency() -> None:
    props = loads_template(TEMPLATE)["Resources"]["Fn"]["Properties"]
    # Stage/Shards are parameters; the deployer intersects with resource ids.
    assert references(props) == {"Table", "Stage", "Shards"}
    assert references({"Fn::Sub": ["${X}-${Y.Arn}-${!Z}", {"X": "literal"}]}) == {"Y"}
