"""Deploys a SAM template into whatever AWS boto3 talks to (normally the embedded moto).

One source of truth: the functions, layers, state machines, buckets, tables and
schedules ``sam deploy`` would create come from the same ``template.yaml``. Resources
are created in dependency order (Ref / GetAtt / Sub / DependsOn), names are
deterministic (``<stack>-<LogicalId>`` unless the template names them) so a re-deploy
updates in place. Each function's code dir and handler are registered with the local
Lambda runtime, which runs the real handler when moto's Lambda is invoked. Resource
types this deployer does not know are skipped with a logged note.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import ClientError

from cachevault.local import lambda_runtime
from cachevault.local.cfn_intrinsics import (
    Context,
    IntrinsicError,
    evaluate_conditions,
    load_template,
    references,
    resolve,
    resolve_parameters,
)

LOG = logging.getLogger(__name__)

DEFAULT_ACCOUNT = "123456789012"


class DeployError(RuntimeError):
    """A resource the deployer supports could not be created."""


@dataclass
class FunctionInfo:
    name: str
    arn: str
    code_dir: Path | None
    handler: str
    env: dict[str, str]
    timeout: int
    logical_id: str = ""
    memory_mb: int = 128
    layers: list[str] = field(default_factory=list)


@dataclass
class ScheduleInfo:
    name: str  # rule / schedule name in EventBridge
    logical_id: str  # the target resource (function or state machine)
    expression: str  # rate(...) or cron(...) or at(...)
    target_arn: str
    input: str | None = None  # JSON text; None = the default event for the source
    event_id: str = ""  # key under the resource's Events (or the rule's logical id)
    kind: str = "Schedule"  # Schedule (EventBridge rule) | ScheduleV2 (EventBridge Scheduler)
    enabled: bool = True

    @property
    def target_is_state_machine(self) -> bool:
        return ":states:" in self.target_arn


@dataclass
class RouteInfo:
    method: str
    path: str
    function_logical_id: str
    function_name: str
    api_logical_id: str


@dataclass
class DeployedStack:
    stack_name: str
    region: str
    account_id: str
    template_path: Path
    functions: dict[str, FunctionInfo] = field(default_factory=dict)
    state_machines: dict[str, str] = field(default_factory=dict)
    buckets: dict[str, str] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)
    layers: dict[str, str] = field(default_factory=dict)  # logical id -> layer version ARN
    schedules: list[ScheduleInfo] = field(default_factory=list)
    routes: list[RouteInfo] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    ecs: dict[str, str] = field(default_factory=dict)  # logical id -> cluster name / task definition ARN
    skipped: dict[str, str] = field(default_factory=dict)  # logical id -> why
    session: boto3.Session | None = field(default=None, repr=False)
    endpoint_url: str | None = None

    def client(self, service: str) -> Any:
        session = self.session or boto3.Session(region_name=self.region)
        return session.client(service, region_name=self.region, endpoint_url=self.endpoint_url)

    def function_name(self, logical_id: str) -> str:
        return self.functions[logical_id].name


# --- entry point ----------------------------------------------------------------------


def deploy(
    template_path: Path,
    *,
    parameter_overrides: dict[str, Any] | None = None,
    stack_name: str = "cachevault",
    session: boto3.Session | None = None,
    endpoint_url: str | None = None,
) -> DeployedStack:
    """Create (or update) every supported resource of ``template_path``.

    Clients honour ``endpoint_url`` or, unset, ``AWS_ENDPOINT_URL`` (boto3 itself), so this
    works against in-process ``mock_aws`` and against the embedded server alike.
    """
    template_path = Path(template_path).resolve()
    template = load_template(template_path)
    session = session or boto3.Session()
    region = session.region_name or "us-east-1"
    stack = DeployedStack(
        stack_name=stack_name,
        region=region,
        account_id=DEFAULT_ACCOUNT,
        template_path=template_path,
        session=session,
        endpoint_url=endpoint_url,
    )
    stack.account_id = _account_id(stack)
    ctx = Context(region=region, account_id=stack.account_id, stack_name=stack_name)
    ctx.parameters = resolve_parameters(template.get("Parameters"), parameter_overrides)
    ctx.mappings = template.get("Mappings") or {}
    evaluate_conditions(template.get("Conditions"), ctx)

    lambda_runtime.install()
    deployer = _Deployer(stack, ctx, template, template_path.parent)
    deployer.run()
    return stack


# --- the work -------------------------------------------------------------------------


class _Deployer:
    def __init__(self, stack: DeployedStack, ctx: Context, template: dict[str, Any], base: Path) -> None:
        self.stack = stack
        self.ctx = ctx
        self.base = base
        self.globals_fn: dict[str, Any] = (template.get("Globals") or {}).get("Function") or {}
        self.resources: dict[str, dict[str, Any]] = {}
        for lid, res in (template.get("Resources") or {}).items():
            cond = res.get("Condition")
            if cond and not ctx.conditions.get(cond, False):
                stack.skipped[lid] = f"condition {cond} is false"
                continue
            self.resources[lid] = res
        self.outputs = template.get("Outputs") or {}
        self.layer_dirs: dict[str, Path] = {}  # layer version ARN -> python dir
        self.s3_notifications: dict[str, list[dict[str, Any]]] = {}  # bucket -> lambda configs
        self._clients: dict[str, Any] = {}
        self._zip = _placeholder_zip()

    def client(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = self.stack.client(service)
        return self._clients[service]

    def run(self) -> None:
        self._implicit_refs()
        creators: dict[str, Callable[[str, dict[str, Any]], None]] = {
            "AWS::Serverless::LayerVersion": self._layer,
            "AWS::Lambda::LayerVersion": self._layer,
            "AWS::Serverless::Function": self._function,
            "AWS::Serverless::StateMachine": self._state_machine,
            "AWS::StepFunctions::StateMachine": self._state_machine,
            "AWS::S3::Bucket": self._bucket,
            "AWS::DynamoDB::Table": self._table,
            "AWS::Serverless::SimpleTable": self._simple_table,
            "AWS::Events::Rule": self._events_rule,
            "AWS::Events::EventBus": self._event_bus,
            "AWS::Scheduler::Schedule": self._scheduler_schedule,
            "AWS::ECS::Cluster": self._ecs_cluster,
            "AWS::ECS::TaskDefinition": self._ecs_task_definition,
        }
        for lid in self._order():
            res = self.resources[lid]
            rtype = str(res.get("Type"))
            creator = creators.get(rtype)
            if creator is None:
                self._skip(lid, rtype)
                continue
            try:
                creator(lid, res.get("Properties") or {})
            except (ClientError, IntrinsicError, OSError, KeyError, ValueError) as exc:
                raise DeployError(f"{lid} ({rtype}): {exc}") from exc
        self._apply_s3_notifications()
        self._outputs()

    # -- ordering and placeholders --

    def _order(self) -> list[str]:
        deps: dict[str, set[str]] = {}
        for lid, res in self.resources.items():
            depends_on = res.get("DependsOn") or []
            depends_on = [depends_on] if isinstance(depends_on, str) else list(depends_on)
            found = references(res.get("Properties") or {}) | set(depends_on)
            if res.get("Type") == "AWS::Serverless::Function":
                found |= references(self.globals_fn)  # Globals.Function applies to every function
            deps[lid] = {d for d in found if d in self.resources and d != lid}
        order: list[str] = []
        done: set[str] = set()
        # Kahn's algorithm; each pass places at least one resource unless there is a cycle.
        for _ in range(len(deps) + 1):
            ready = [lid for lid in deps if lid not in done and deps[lid] <= done]
            if not ready:
                break
            for lid in ready:
                order.append(lid)
                done.add(lid)
        rest = [lid for lid in deps if lid not in done]
        if rest:
            LOG.warning("dependency cycle among %s; creating them in template order", rest)
            order.extend(rest)
        return order

    def _implicit_refs(self) -> None:
        # SAM's generated resources that templates refer to: <Function>Role, ServerlessRestApi.
        for lid, res in self.resources.items():
            if res.get("Type") in ("AWS::Serverless::Function", "AWS::Serverless::StateMachine"):
                role = self._role_arn(lid)
                self.ctx.refs[f"{lid}Role"] = role.rsplit("/", 1)[1]
                self.ctx.attrs[(f"{lid}Role", "Arn")] = role
        self.ctx.refs.setdefault("ServerlessRestApi", "cvlocalapi")
        self.ctx.attrs[("ServerlessRestApi", "RootResourceId")] = "cvlocalroot"

    def _skip(self, lid: str, rtype: str) -> None:
        LOG.info("local deployer: skipping %s (%s): not emulated", lid, rtype)
        self.stack.skipped[lid] = f"{rtype} is not emulated locally"
        # Refs to it still resolve, to a stable placeholder, so dependents deploy.
        physical = f"{self.stack.stack_name}-{lid}"
        self.ctx.refs.setdefault(lid, physical)
        service = rtype.split("::")[1].lower() if rtype.count("::") >= 2 else "cloudformation"
        self.ctx.attrs.setdefault(
            (lid, "Arn"), f"arn:{self.ctx.partition}:{service}:{self.stack.region}:{self.stack.account_id}:{physical}"
        )

    def _name(self, lid: str, props: dict[str, Any], key: str, limit: int = 64) -> str:
        if props.get(key) is not None:
            return str(resolve(props[key], self.ctx))
        return f"{self.stack.stack_name}-{lid}"[:limit]

    def _role_arn(self, lid: str) -> str:
        name = f"{self.stack.stack_name}-{lid}-role"[:64]
        return f"arn:{self.ctx.partition}:iam::{self.stack.account_id}:role/{name}"

    def _ensure_role(self, lid: str, principal: str) -> str:
        arn = self._role_arn(lid)
        trust = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": principal}, "Action": "sts:AssumeRole"}],
        }
        try:
            self.client("iam").create_role(RoleName=arn.rsplit("/", 1)[1], AssumeRolePolicyDocument=json.dumps(trust))
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "EntityAlreadyExists":
                raise
        return arn

    # -- layers and functions --

    def _layer(self, lid: str, props: dict[str, Any]) -> None:
        name = self._name(lid, props, "LayerName", 140)
        content = props.get("ContentUri") or props.get("Content")
        python_dir: Path | None = None
        if isinstance(content, str):
            root = (self.base / content).resolve()
            python_dir = root / "python" if (root / "python").is_dir() else root
        lam = self.client("lambda")
        existing = lam.list_layer_versions(LayerName=name).get("LayerVersions", [])
        if existing:
            arn = max(existing, key=lambda v: v["Version"])["LayerVersionArn"]
        else:
            arn = lam.publish_layer_version(
                LayerName=name,
                Content={"ZipFile": self._zip},
                CompatibleRuntimes=list(resolve(props.get("CompatibleRuntimes") or ["python3.11"], self.ctx)),
            )["LayerVersionArn"]
        self.ctx.refs[lid] = arn
        self.stack.layers[lid] = arn
        if python_dir is not None and python_dir.is_dir():  # e.g. a sam-build-only layer is absent
            self.layer_dirs[arn] = python_dir

    def _function(self, lid: str, raw_props: dict[str, Any]) -> None:
        # Events and Policies are not function configuration (events are handled below,
        # IAM is not enforced locally): leave them out of the resolution.
        wanted = {k: v for k, v in raw_props.items() if k not in ("Events", "Policies")}
        props = resolve(_merge_globals(self.globals_fn, wanted), self.ctx)
        name = self._name(lid, raw_props, "FunctionName")
        code = props.get("CodeUri") or props.get("Code")
        code_dir = (self.base / code).resolve() if isinstance(code, str) else None
        if code_dir is None:
            LOG.warning("%s: CodeUri is not a local directory; invoking it will fail locally", lid)
        handler = str(props.get("Handler", "app.lambda_handler"))
        env = {k: _env_text(v) for k, v in ((props.get("Environment") or {}).get("Variables") or {}).items()}
        timeout = int(props.get("Timeout", 3))
        memory = int(props.get("MemorySize", 128))
        layers = [str(arn) for arn in props.get("Layers") or []]
        role = str(props["Role"]) if props.get("Role") else self._ensure_role(lid, "lambda.amazonaws.com")
        config: dict[str, Any] = {
            "Runtime": str(props.get("Runtime", "python3.11")),
            "Role": role,
            "Handler": handler,
            "Timeout": timeout,
            "MemorySize": memory,
            "Environment": {"Variables": env},
            "Layers": layers,
            "Description": str(props.get("Description", "")),
        }
        if isinstance(props.get("EphemeralStorage"), dict):  # the private /tmp size the runtime enforces
            config["EphemeralStorage"] = {"Size": int(props["EphemeralStorage"]["Size"])}
        lam = self.client("lambda")
        try:
            arn = lam.create_function(FunctionName=name, Code={"ZipFile": self._zip}, **config)["FunctionArn"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceConflictException":
                raise
            arn = lam.update_function_configuration(FunctionName=name, **config)["FunctionArn"]
        self.ctx.refs[lid] = name
        self.ctx.attrs[(lid, "Arn")] = arn
        self.stack.functions[lid] = FunctionInfo(
            name=name,
            arn=arn,
            code_dir=code_dir,
            handler=handler,
            env=env,
            timeout=timeout,
            logical_id=lid,
            memory_mb=memory,
            layers=layers,
        )
        if code_dir is not None:
            lambda_runtime.RUNTIME.register(
                lambda_runtime.HandlerSpec(
                    function_name=name,
                    code_dir=code_dir,
                    handler=handler,
                    layer_dirs=tuple(self.layer_dirs[a] for a in layers if a in self.layer_dirs),
                )
            )
        for event_id, event in (raw_props.get("Events") or {}).items():
            self._function_event(lid, name, arn, event_id, event)

    def _function_event(self, lid: str, name: str, arn: str, event_id: str, event: dict[str, Any]) -> None:
        etype = str(event.get("Type"))
        props = resolve(event.get("Properties") or {}, self.ctx)
        if etype in ("Schedule", "ScheduleV2"):
            self._schedule(lid, arn, event_id, etype, props)
        elif etype == "Api" or etype == "HttpApi":
            api = props.get("RestApiId") or props.get("ApiId") or "ServerlessRestApi"
            self.stack.routes.append(
                RouteInfo(str(props.get("Method", "ANY")).upper(), str(props.get("Path", "/")), lid, name, str(api))
            )
        elif etype == "S3":
            events = props.get("Events") or []
            config: dict[str, Any] = {
                "LambdaFunctionArn": arn,
                "Events": [events] if isinstance(events, str) else list(events),
            }
            rules = ((props.get("Filter") or {}).get("S3Key") or {}).get("Rules")
            if rules:  # CFN spells it S3Key.Rules, the S3 API Key.FilterRules
                config["Filter"] = {"Key": {"FilterRules": rules}}
            self.s3_notifications.setdefault(str(props["Bucket"]), []).append(config)
        else:
            LOG.info("local deployer: %s event %s of type %s is not emulated", lid, event_id, etype)
            self.stack.skipped[f"{lid}.{event_id}"] = f"event type {etype} is not emulated locally"

    def _apply_s3_notifications(self) -> None:
        s3 = self.client("s3")
        for bucket, configs in self.s3_notifications.items():
            # Note: moto delivers these synchronously, inside the PutObject call.
            s3.put_bucket_notification_configuration(
                Bucket=bucket, NotificationConfiguration={"LambdaFunctionConfigurations": configs}
            )

    # -- schedules --

    def _schedule(self, lid: str, target_arn: str, event_id: str, etype: str, props: dict[str, Any]) -> None:
        expression = str(props.get("Schedule") or props.get("ScheduleExpression") or "")
        if not expression:
            raise DeployError(f"{lid}.{event_id}: schedule without an expression")
        enabled = _schedule_enabled(props)
        name = str(props.get("Name") or f"{self.stack.stack_name}-{lid}-{event_id}")[:64]
        raw_input = props.get("Input")
        info = ScheduleInfo(
            name=name,
            logical_id=lid,
            expression=expression,
            target_arn=target_arn,
            input=None if raw_input is None else _json_text(raw_input),
            event_id=event_id,
            kind="ScheduleV2" if etype == "ScheduleV2" else "Schedule",
            enabled=enabled,
        )
        self._register_schedule(info)

    def _register_schedule(self, info: ScheduleInfo) -> None:
        self.stack.schedules = [s for s in self.stack.schedules if s.name != info.name]
        self.stack.schedules.append(info)
        # Mirror it in moto so list_rules / list_schedules show it; moto never fires it.
        try:
            if info.kind == "ScheduleV2":
                self._mirror_scheduler(info)
            else:
                self._mirror_rule(info)
        except ClientError as exc:
            LOG.info("could not mirror schedule %s in moto: %s", info.name, exc)

    def _mirror_rule(self, info: ScheduleInfo) -> None:
        events = self.client("events")
        events.put_rule(
            Name=info.name, ScheduleExpression=info.expression, State="ENABLED" if info.enabled else "DISABLED"
        )
        target: dict[str, Any] = {"Id": "target", "Arn": info.target_arn}
        if info.input is not None:
            target["Input"] = info.input
        events.put_targets(Rule=info.name, Targets=[target])

    def _mirror_scheduler(self, info: ScheduleInfo) -> None:
        scheduler = self.client("scheduler")
        target: dict[str, Any] = {"Arn": info.target_arn, "RoleArn": self._role_arn(info.logical_id)}
        if info.input is not None:
            target["Input"] = info.input
        args: dict[str, Any] = {
            "Name": info.name,
            "ScheduleExpression": info.expression,
            "FlexibleTimeWindow": {"Mode": "OFF"},
            "Target": target,
            "State": "ENABLED" if info.enabled else "DISABLED",
        }
        try:
            scheduler.create_schedule(**args)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConflictException":
                raise
            scheduler.update_schedule(**args)

    # -- ECS (tasks run as local processes: cachevault.local.ecs) --

    def _ecs_cluster(self, lid: str, raw_props: dict[str, Any]) -> None:
        name = self._name(lid, raw_props, "ClusterName", 255)
        self.client("ecs").create_cluster(clusterName=name)
        self.ctx.refs[lid] = name
        region, account = self.stack.region, self.stack.account_id
        self.ctx.attrs[(lid, "Arn")] = f"arn:{self.ctx.partition}:ecs:{region}:{account}:cluster/{name}"
        self.stack.ecs[lid] = name

    def _ecs_task_definition(self, lid: str, raw_props: dict[str, Any]) -> None:
        props = _camel_keys(resolve(raw_props, self.ctx))
        props.setdefault("family", f"{self.stack.stack_name}-{lid}")
        for key in ("taskRoleArn", "executionRoleArn"):
            if key in props and not str(props[key]).startswith("arn:"):
                props.pop(key)
        arn = self.client("ecs").register_task_definition(**props)["taskDefinition"]["taskDefinitionArn"]
        self.ctx.refs[lid] = arn
        self.ctx.attrs[(lid, "TaskDefinitionArn")] = arn
        self.stack.ecs[lid] = arn

    def _event_bus(self, lid: str, raw_props: dict[str, Any]) -> None:
        name = self._name(lid, raw_props, "Name", 256)
        events = self.client("events")
        try:
            events.describe_event_bus(Name=name)
        except ClientError:
            events.create_event_bus(Name=name)
        self.ctx.refs[lid] = name
        self.ctx.attrs[(lid, "Arn")] = (
            f"arn:{self.ctx.partition}:events:{self.stack.region}:{self.stack.account_id}:event-bus/{name}"
        )
        self.ctx.attrs[(lid, "Name")] = name

    def _events_rule(self, lid: str, raw_props: dict[str, Any]) -> None:
        props = resolve(raw_props, self.ctx)
        name = self._name(lid, raw_props, "Name")
        arn = f"arn:{self.ctx.partition}:events:{self.stack.region}:{self.stack.account_id}:rule/{name}"
        self.ctx.refs[lid] = name
        self.ctx.attrs[(lid, "Arn")] = arn
        expression = props.get("ScheduleExpression")
        if not expression:
            self.stack.skipped[lid] = "event-pattern rules are not emulated locally"
            return
        for target in props.get("Targets") or []:
            target_arn = str(target["Arn"])
            info = ScheduleInfo(
                name=name if len(props.get("Targets")) == 1 else f"{name}-{target.get('Id', 'target')}",
                logical_id=self._logical_for_arn(target_arn),
                expression=str(expression),
                target_arn=target_arn,
                input=None if target.get("Input") is None else _json_text(target["Input"]),
                event_id=lid,
                kind="Schedule",
                enabled=_schedule_enabled(props),
            )
            self._register_schedule(info)

    def _scheduler_schedule(self, lid: str, raw_props: dict[str, Any]) -> None:
        props = resolve(raw_props, self.ctx)
        name = self._name(lid, raw_props, "Name")
        self.ctx.refs[lid] = name
        target = props.get("Target") or {}
        target_arn = str(target.get("Arn", ""))
        info = ScheduleInfo(
            name=name,
            logical_id=self._logical_for_arn(target_arn),
            expression=str(props["ScheduleExpression"]),
            target_arn=target_arn,
            input=None if target.get("Input") is None else _json_text(target["Input"]),
            event_id=lid,
            kind="ScheduleV2",
            enabled=_schedule_enabled(props),
        )
        self.stack.schedules = [s for s in self.stack.schedules if s.name != info.name]
        self.stack.schedules.append(info)

    def _logical_for_arn(self, arn: str) -> str:
        for lid, fn in self.stack.functions.items():
            if fn.arn == arn:
                return lid
        for lid, sm_arn in self.stack.state_machines.items():
            if sm_arn == arn:
                return lid
        return ""

    # -- state machines --

    def _state_machine(self, lid: str, raw_props: dict[str, Any]) -> None:
        props = raw_props
        name = self._name(lid, raw_props, "StateMachineName" if "StateMachineName" in props else "Name", 80)
        definition = self._definition(lid, props)
        role = props.get("Role") or props.get("RoleArn")
        role_arn = str(resolve(role, self.ctx)) if role else self._ensure_role(lid, "states.amazonaws.com")
        sm_type = str(props.get("Type", "STANDARD"))
        arn = f"arn:{self.ctx.partition}:states:{self.stack.region}:{self.stack.account_id}:stateMachine:{name}"
        sfn = self.client("stepfunctions")
        try:
            sfn.describe_state_machine(stateMachineArn=arn)
            sfn.update_state_machine(stateMachineArn=arn, definition=definition, roleArn=role_arn)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "StateMachineDoesNotExist":
                raise
            arn = sfn.create_state_machine(name=name, definition=definition, roleArn=role_arn, type=sm_type)[
                "stateMachineArn"
            ]
        self.ctx.refs[lid] = arn
        self.ctx.attrs[(lid, "Arn")] = arn
        self.ctx.attrs[(lid, "Name")] = name
        self.stack.state_machines[lid] = arn
        for event_id, event in (props.get("Events") or {}).items():
            etype = str(event.get("Type"))
            if etype in ("Schedule", "ScheduleV2"):
                self._schedule(lid, arn, event_id, etype, resolve(event.get("Properties") or {}, self.ctx))
            else:
                LOG.info("local deployer: %s event %s of type %s is not emulated", lid, event_id, etype)
                self.stack.skipped[f"{lid}.{event_id}"] = f"event type {etype} is not emulated locally"

    def _definition(self, lid: str, props: dict[str, Any]) -> str:
        if props.get("DefinitionUri") is not None or props.get("DefinitionS3Location") is not None:
            uri = resolve(props.get("DefinitionUri"), self.ctx)
            if not isinstance(uri, str):
                raise DeployError(f"{lid}: only a local DefinitionUri file is supported")
            text = (self.base / uri).read_text(encoding="utf-8")
        elif props.get("DefinitionString") is not None:
            text = str(resolve(props["DefinitionString"], self.ctx))
        elif props.get("Definition") is not None:
            text = json.dumps(resolve(props["Definition"], self.ctx))
        else:
            raise DeployError(f"{lid}: state machine has no definition")
        substitutions = resolve(props.get("DefinitionSubstitutions") or {}, self.ctx)
        for key, value in substitutions.items():
            text = text.replace("${" + key + "}", _env_text(value))
        json.loads(text)  # fail here, naming the resource, rather than inside moto
        return text

    # -- storage --

    def _bucket(self, lid: str, raw_props: dict[str, Any]) -> None:
        props = resolve(raw_props, self.ctx)
        name = self._name(lid, raw_props, "BucketName", 63).lower()
        s3 = self.client("s3")
        try:
            s3.head_bucket(Bucket=name)
        except ClientError:
            args: dict[str, Any] = {"Bucket": name}
            if self.stack.region != "us-east-1":
                args["CreateBucketConfiguration"] = {"LocationConstraint": self.stack.region}
            s3.create_bucket(**args)
        status = (props.get("VersioningConfiguration") or {}).get("Status")
        if status:
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": status})
        encryption = props.get("BucketEncryption")
        if encryption:
            s3.put_bucket_encryption(
                Bucket=name,
                ServerSideEncryptionConfiguration={
                    "Rules": [_encryption_rule(r) for r in encryption["ServerSideEncryptionConfiguration"]]
                },
            )
        public_access = props.get("PublicAccessBlockConfiguration")
        if public_access:
            s3.put_public_access_block(Bucket=name, PublicAccessBlockConfiguration=public_access)
        self.ctx.refs[lid] = name
        self.ctx.attrs[(lid, "Arn")] = f"arn:{self.ctx.partition}:s3:::{name}"
        self.ctx.attrs[(lid, "DomainName")] = f"{name}.s3.amazonaws.com"
        self.ctx.attrs[(lid, "RegionalDomainName")] = f"{name}.s3.{self.stack.region}.amazonaws.com"
        self.stack.buckets[lid] = name

    def _table(self, lid: str, raw_props: dict[str, Any]) -> None:
        props = resolve(raw_props, self.ctx)
        name = self._name(lid, raw_props, "TableName", 255)
        billing = str(props.get("BillingMode", "PROVISIONED"))
        args: dict[str, Any] = {
            "TableName": name,
            "KeySchema": props["KeySchema"],
            "AttributeDefinitions": props["AttributeDefinitions"],
            "BillingMode": billing,
        }
        throughput = {"ReadCapacityUnits": 5, "WriteCapacityUnits": 5}
        if billing == "PROVISIONED":
            args["ProvisionedThroughput"] = _int_values(props.get("ProvisionedThroughput") or throughput)
        gsis = []
        for gsi in props.get("GlobalSecondaryIndexes") or []:
            gsi = dict(gsi)
            gsi.pop("ContributorInsightsSpecification", None)
            if billing == "PROVISIONED":
                gsi["ProvisionedThroughput"] = _int_values(gsi.get("ProvisionedThroughput") or throughput)
            gsis.append(gsi)
        if gsis:
            args["GlobalSecondaryIndexes"] = gsis
        if props.get("LocalSecondaryIndexes"):
            args["LocalSecondaryIndexes"] = props["LocalSecondaryIndexes"]
        if props.get("StreamSpecification"):
            args["StreamSpecification"] = {"StreamEnabled": True, **props["StreamSpecification"]}
        self._create_table(lid, name, args, props.get("TimeToLiveSpecification"))

    def _simple_table(self, lid: str, raw_props: dict[str, Any]) -> None:
        props = resolve(raw_props, self.ctx)
        name = self._name(lid, raw_props, "TableName", 255)
        key = props.get("PrimaryKey") or {"Name": "id", "Type": "String"}
        args = {
            "TableName": name,
            "KeySchema": [{"AttributeName": key["Name"], "KeyType": "HASH"}],
            "AttributeDefinitions": [{"AttributeName": key["Name"], "AttributeType": str(key["Type"])[0].upper()}],
            "BillingMode": "PAY_PER_REQUEST",
        }
        self._create_table(lid, name, args, None)

    def _create_table(self, lid: str, name: str, args: dict[str, Any], ttl: dict[str, Any] | None) -> None:
        ddb = self.client("dynamodb")
        try:
            desc = ddb.describe_table(TableName=name)["Table"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceNotFoundException":
                raise
            desc = ddb.create_table(**args)["TableDescription"]
        if ttl and str(ttl.get("Enabled", "false")).lower() == "true":
            current = ddb.describe_time_to_live(TableName=name)["TimeToLiveDescription"]
            if current.get("TimeToLiveStatus") != "ENABLED":
                ddb.update_time_to_live(
                    TableName=name,
                    TimeToLiveSpecification={"Enabled": True, "AttributeName": ttl["AttributeName"]},
                )
        self.ctx.refs[lid] = name
        self.ctx.attrs[(lid, "Arn")] = desc["TableArn"]
        if desc.get("LatestStreamArn"):
            self.ctx.attrs[(lid, "StreamArn")] = desc["LatestStreamArn"]
        self.stack.tables[lid] = name

    # -- outputs --

    def _outputs(self) -> None:
        for key, out in self.outputs.items():
            cond = out.get("Condition")
            if cond and not self.ctx.conditions.get(cond, False):
                continue
            try:
                self.stack.outputs[key] = resolve(out.get("Value"), self.ctx)
            except IntrinsicError as exc:
                LOG.info("output %s not resolvable locally: %s", key, exc)


# --- helpers --------------------------------------------------------------------------


def _account_id(stack: DeployedStack) -> str:
    try:
        return str(stack.client("sts").get_caller_identity()["Account"])
    except ClientError:
        return DEFAULT_ACCOUNT


def _merge_globals(globals_fn: dict[str, Any], props: dict[str, Any]) -> dict[str, Any]:
    """SAM's Globals rules: maps merge (resource wins), lists concatenate, scalars override."""
    merged: dict[str, Any] = dict(globals_fn)
    for key, value in props.items():
        base = merged.get(key)
        if isinstance(base, dict) and isinstance(value, dict) and not _is_intrinsic(value):
            merged[key] = _merge_globals(base, value)
        elif isinstance(base, list) and isinstance(value, list):
            merged[key] = base + [v for v in value if v not in base]
        else:
            merged[key] = value
    return merged


def _is_intrinsic(value: dict[str, Any]) -> bool:
    return (len(value) == 1 and next(iter(value)) in ("Ref", "Condition")) or any(k.startswith("Fn::") for k in value)


def _camel_keys(value: Any) -> Any:
    """CloudFormation's PascalCase properties in the ECS API's camelCase (values untouched)."""
    if isinstance(value, dict):
        return {k[:1].lower() + k[1:]: _camel_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_camel_keys(v) for v in value]
    return value


def _env_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _int_values(d: dict[str, Any]) -> dict[str, int]:
    return {k: int(v) for k, v in d.items()}


def _schedule_enabled(props: dict[str, Any]) -> bool:
    if "State" in props:
        return str(props["State"]).upper() == "ENABLED"
    return str(props.get("Enabled", True)).lower() != "false"


def _encryption_rule(rule: dict[str, Any]) -> dict[str, Any]:
    """CloudFormation's bucket encryption rule in the S3 API's spelling."""
    api: dict[str, Any] = {}
    if "ServerSideEncryptionByDefault" in rule:
        api["ApplyServerSideEncryptionByDefault"] = rule["ServerSideEncryptionByDefault"]
    if "BucketKeyEnabled" in rule:
        api["BucketKeyEnabled"] = bool(rule["BucketKeyEnabled"])
    return api


def _placeholder_zip() -> bytes:
    # moto needs a zip to create a function/layer; the code actually run is on disk.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("README.txt", "cachevault local: the handler runs from the template's CodeUri\n")
    return buf.getvalue()
