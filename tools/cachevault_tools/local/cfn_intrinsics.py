"""CloudFormation template reading: the short-form YAML tags and intrinsic functions.

The local deployer needs the same values CloudFormation would compute (names, ARNs,
substitutions) so the embedded AWS matches what ``sam deploy`` creates. Only what a SAM
app of this size uses is implemented; anything else raises :class:`IntrinsicError`
with the construct named, so the caller can skip that property with a note.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NO_VALUE = object()  # AWS::NoValue: the enclosing key / list item disappears

_SUB_VAR = re.compile(r"\$\{([^}]*)\}")


class IntrinsicError(ValueError):
    """A template construct that cannot be resolved locally."""


# --- YAML -----------------------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """SafeLoader plus CloudFormation's short-form tags (``!Ref``, ``!GetAtt`` ...)."""


def _tag(name: str) -> Callable[[yaml.Loader, yaml.Node], dict[str, Any]]:
    key = "Ref" if name == "Ref" else f"Fn::{name}"

    def construct(loader: yaml.Loader, node: yaml.Node) -> dict[str, Any]:
        if isinstance(node, yaml.ScalarNode):
            value: Any = loader.construct_scalar(node)
            # !GetAtt Res.Attr is the short spelling of [Res, Attr]
            if name == "GetAtt":
                value = str(value).split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {key: value}

    return construct


for _name in (
    "Ref",
    "GetAtt",
    "Sub",
    "Join",
    "If",
    "Select",
    "Split",
    "Equals",
    "Not",
    "And",
    "Or",
    "FindInMap",
    "GetAZs",
    "Base64",
    "ImportValue",
    "Condition",
    "Cidr",
    "Length",
    "ToJsonString",
):
    _CfnLoader.add_constructor(f"!{_name}", _tag(_name))


def _condition_tag(loader: yaml.Loader, node: yaml.Node) -> dict[str, Any]:
    # `!Condition X` inside Fn::And/Or is the bare name, not Fn::Condition
    return {"Condition": loader.construct_scalar(node)}  # type: ignore[arg-type]


_CfnLoader.add_constructor("!Condition", _condition_tag)


def load_template(path: Path | str) -> dict[str, Any]:
    """Parse a CloudFormation/SAM template (YAML or JSON) with short-form tags."""
    text = Path(path).read_text(encoding="utf-8")
    return loads_template(text)


def loads_template(text: str) -> dict[str, Any]:
    data = yaml.load(text, Loader=_CfnLoader)
    if not isinstance(data, dict):
        raise IntrinsicError("template is not a mapping")
    return data


# --- evaluation -----------------------------------------------------------------------


@dataclass
class Context:
    """What intrinsics resolve against.

    ``refs`` maps a logical id to its ``Ref`` value and ``attrs`` maps
    ``(logical id, attribute)`` to ``Fn::GetAtt``; the deployer fills both as it creates
    resources. ``resolve_missing`` may supply values for resources not created yet.
    """

    region: str = "us-east-1"
    account_id: str = "123456789012"
    stack_name: str = "cachevault"
    parameters: dict[str, Any] = field(default_factory=dict)
    conditions: dict[str, bool] = field(default_factory=dict)
    mappings: dict[str, Any] = field(default_factory=dict)
    refs: dict[str, Any] = field(default_factory=dict)
    attrs: dict[tuple[str, str], Any] = field(default_factory=dict)

    @property
    def partition(self) -> str:
        return "aws-cn" if self.region.startswith("cn-") else "aws"

    def pseudo(self, name: str) -> Any:
        values: dict[str, Any] = {
            "AWS::Region": self.region,
            "AWS::AccountId": self.account_id,
            "AWS::StackName": self.stack_name,
            "AWS::StackId": (
                f"arn:{self.partition}:cloudformation:{self.region}:{self.account_id}:"
                f"stack/{self.stack_name}/00000000-0000-0000-0000-000000000000"
            ),
            "AWS::Partition": self.partition,
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::NotificationARNs": [],
            "AWS::NoValue": NO_VALUE,
        }
        if name not in values:
            raise IntrinsicError(f"unknown pseudo parameter {name}")
        return values[name]

    def ref(self, name: str) -> Any:
        if name.startswith("AWS::"):
            return self.pseudo(name)
        if name in self.parameters:
            return self.parameters[name]
        if name in self.refs:
            return self.refs[name]
        raise IntrinsicError(f"Ref to unknown or not yet created resource {name}")

    def get_att(self, name: str, attr: str) -> Any:
        if (name, attr) in self.attrs:
            return self.attrs[(name, attr)]
        raise IntrinsicError(f"Fn::GetAtt {name}.{attr} is not known")


def resolve(value: Any, ctx: Context) -> Any:
    """Resolve every intrinsic in ``value`` (recursively); drops AWS::NoValue entries."""
    if isinstance(value, dict):
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref" or key.startswith("Fn::") or (key == "Condition" and _is_bare(arg)):
                return _call(key, arg, ctx)
        out: dict[str, Any] = {}
        for key, item in value.items():
            resolved = resolve(item, ctx)
            if resolved is not NO_VALUE:
                out[key] = resolved
        return out
    if isinstance(value, list):
        return [r for r in (resolve(item, ctx) for item in value) if r is not NO_VALUE]
    return value


def _is_bare(arg: Any) -> bool:
    return isinstance(arg, str)


def _call(key: str, arg: Any, ctx: Context) -> Any:
    fn = _FUNCTIONS.get(key)
    if fn is None:
        raise IntrinsicError(f"unsupported intrinsic {key}")
    return fn(arg, ctx)


def _ref(arg: Any, ctx: Context) -> Any:
    return ctx.ref(str(resolve(arg, ctx)))


def _get_att(arg: Any, ctx: Context) -> Any:
    if isinstance(arg, str):
        arg = arg.split(".", 1)
    name, attr = (resolve(a, ctx) for a in arg)
    return ctx.get_att(str(name), str(attr))


def _sub(arg: Any, ctx: Context) -> str:
    if isinstance(arg, list):
        template, variables = arg[0], resolve(arg[1], ctx)
    else:
        template, variables = arg, {}
    if not isinstance(template, str):
        raise IntrinsicError("Fn::Sub template must be a string")

    def replace(match: re.Match[str]) -> str:
        name = match.group(1).strip()
        if name.startswith("!"):  # ${!Literal} is written out as ${Literal}
            return "${" + name[1:] + "}"
        if name in variables:
            return _as_text(variables[name])
        if "." in name and not name.startswith("AWS::"):
            res, attr = name.split(".", 1)
            return _as_text(ctx.get_att(res, attr))
        return _as_text(ctx.ref(name))

    return _SUB_VAR.sub(replace, template)


def _as_text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _join(arg: Any, ctx: Context) -> str:
    delimiter, items = arg
    items = resolve(items, ctx)
    return str(delimiter).join(_as_text(i) for i in items)


def _select(arg: Any, ctx: Context) -> Any:
    index, items = resolve(arg[0], ctx), resolve(arg[1], ctx)
    return items[int(index)]


def _split(arg: Any, ctx: Context) -> list[str]:
    delimiter, source = arg
    return str(resolve(source, ctx)).split(str(delimiter))


def _if(arg: Any, ctx: Context) -> Any:
    name, when_true, when_false = arg
    return resolve(when_true if condition_value(name, ctx) else when_false, ctx)


def _equals(arg: Any, ctx: Context) -> bool:
    a, b = (resolve(x, ctx) for x in arg)
    return str(a) == str(b)


def _not(arg: Any, ctx: Context) -> bool:
    return not _truth(arg[0], ctx)


def _and(arg: Any, ctx: Context) -> bool:
    return all(_truth(a, ctx) for a in arg)


def _or(arg: Any, ctx: Context) -> bool:
    return any(_truth(a, ctx) for a in arg)


def _truth(value: Any, ctx: Context) -> bool:
    resolved = resolve(value, ctx)
    if isinstance(resolved, bool):
        return resolved
    return str(resolved).lower() == "true"


def _condition(arg: Any, ctx: Context) -> bool:
    return condition_value(str(arg), ctx)


def _find_in_map(arg: Any, ctx: Context) -> Any:
    name, top, second = (resolve(a, ctx) for a in arg[:3])
    try:
        return ctx.mappings[name][top][second]
    except KeyError as exc:
        raise IntrinsicError(f"Fn::FindInMap {name}/{top}/{second} not found") from exc


def _get_azs(arg: Any, ctx: Context) -> list[str]:
    region = resolve(arg, ctx) or ctx.region
    return [f"{region}{suffix}" for suffix in "abc"]


def _base64(arg: Any, ctx: Context) -> str:
    return base64.b64encode(str(resolve(arg, ctx)).encode()).decode()


def _length(arg: Any, ctx: Context) -> int:
    return len(resolve(arg, ctx))


def _to_json_string(arg: Any, ctx: Context) -> str:
    import json

    return json.dumps(resolve(arg, ctx), separators=(",", ":"))


_FUNCTIONS: dict[str, Callable[[Any, Context], Any]] = {
    "Ref": _ref,
    "Fn::GetAtt": _get_att,
    "Fn::Sub": _sub,
    "Fn::Join": _join,
    "Fn::Select": _select,
    "Fn::Split": _split,
    "Fn::If": _if,
    "Fn::Equals": _equals,
    "Fn::Not": _not,
    "Fn::And": _and,
    "Fn::Or": _or,
    "Condition": _condition,
    "Fn::FindInMap": _find_in_map,
    "Fn::GetAZs": _get_azs,
    "Fn::Base64": _base64,
    "Fn::Length": _length,
    "Fn::ToJsonString": _to_json_string,
}


# --- parameters and conditions --------------------------------------------------------


def resolve_parameters(
    declared: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Parameter values: override, else Default; validated against AllowedValues.

    ``Ref`` to a CommaDelimitedList (or ``List<...>``) parameter is a list, like CFN.
    """
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(declared or {})
    if unknown:
        raise IntrinsicError(f"unknown template parameters: {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name, spec in (declared or {}).items():
        spec = spec or {}
        if name in overrides:
            value = overrides[name]
        elif "Default" in spec:
            value = spec["Default"]
        else:
            raise IntrinsicError(f"parameter {name} has no Default and no override")
        ptype = str(spec.get("Type", "String"))
        if ptype == "CommaDelimitedList" or ptype.startswith("List<"):
            value = value if isinstance(value, list) else [v.strip() for v in str(value).split(",")]
        else:
            value = str(value).lower() if isinstance(value, bool) else str(value)
        allowed = spec.get("AllowedValues")
        if allowed is not None and not isinstance(value, list) and value not in [str(a) for a in allowed]:
            raise IntrinsicError(f"parameter {name}={value!r} is not one of {allowed}")
        values[name] = value
    return values


def condition_value(name: str, ctx: Context) -> bool:
    if name not in ctx.conditions:
        raise IntrinsicError(f"unknown condition {name}")
    return ctx.conditions[name]


def evaluate_conditions(declared: Mapping[str, Any] | None, ctx: Context) -> dict[str, bool]:
    """Evaluate the template's Conditions (they may refer to each other, in any order)."""
    pending = dict(declared or {})
    # Each pass settles at least one condition unless they form a cycle: bounded by len.
    for _ in range(len(pending) + 1):
        if not pending:
            break
        for name, expr in list(pending.items()):
            try:
                ctx.conditions[name] = _truth(expr, ctx)
            except IntrinsicError:
                continue
            del pending[name]
    if pending:
        raise IntrinsicError(f"conditions cannot be evaluated: {sorted(pending)}")
    return ctx.conditions


def references(value: Any) -> set[str]:
    """Logical ids that ``value`` refers to (Ref, GetAtt, ${X} / ${X.Attr} in Sub)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if len(node) == 1:
                ((key, arg),) = node.items()
                if key == "Ref" and isinstance(arg, str):
                    found.add(arg)
                    return
                if key == "Fn::GetAtt":
                    parts = arg.split(".", 1) if isinstance(arg, str) else arg
                    if parts and isinstance(parts[0], str):
                        found.add(parts[0])
                    return
                if key == "Fn::Sub":
                    template = arg[0] if isinstance(arg, list) else arg
                    local = set(arg[1]) if isinstance(arg, list) and isinstance(arg[1], dict) else set()
                    if isinstance(template, str):
                        for var in _SUB_VAR.findall(template):
                            var = var.strip()
                            if var.startswith("!") or var in local:
                                continue
                            found.add(var.split(".", 1)[0])
                    if isinstance(arg, list):
                        walk(arg[1])
                    return
            for item in node.values():
                walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(value)
    return {name for name in found if not name.startswith("AWS::")}
