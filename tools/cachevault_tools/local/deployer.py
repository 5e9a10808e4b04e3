"""Deploys a SAM template into whatever AWS boto3 talks to (normally the embedded moto).

The template goes through the real SAM translator first (:mod:`cachevault_tools.local.sam_translate`):
what is created here is the CloudFormation ``sam deploy`` would submit, IAM roles and
policies included. This module creates those CloudFormation resources through the AWS
APIs, in dependency order (Ref / GetAtt / Sub / DependsOn), with deterministic names
(``<stack>-<LogicalId>`` unless the template names them) so a re-deploy updates in place.
It keeps only the glue moto's own CloudFormation lacks (DESIGN.md "moto facts"): local
code directories registered with the local Lambda runtime, definitions read from the
local file with ``DefinitionSubstitutions`` applied, the bucket's Lambda notifications,
the schedules the local ticker fires (cachevault_tools/local/schedules.py), an API's routes.
Resource types this deployer does not know are skipped with a logged note.
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

from cachevault_tools.local import lambda_runtime, layer_build
from cachevault_tools.local.cfn_intrinsics import (
    Context,
    IntrinsicError,
    evaluate_conditions,
    load_template,
    references,
    resolve,
    resolve_parameters,
)
from cachevault_tools.local.sam_translate import aws_managed_policy_map, local_path, translate

LOG = logging.getLogger(__name__)

DEFAULT_ACCOUNT = "123456789012"
_PERMISSION = "AWS::Lambda::Permission"


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
    role_arn: str = ""


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
    state_machine_roles: dict[str, str] = field(default_factory=dict)  # logical id -> role ARN
    buckets: dict[str, str] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)
    layers: dict[str, str] = field(default_factory=dict)  # SAM logical id -> layer version ARN
    roles: dict[str, str] = field(default_factory=dict)  # logical id -> role ARN
    schedules: list[ScheduleInfo] = field(default_factory=list)
    routes: list[RouteInfo] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    ecs: dict[str, str] = field(default_factory=dict)  # logical id -> cluster name / task definition ARN
    skipped: dict[str, str] = field(default_factory=dict)  # logical id -> why
    cloudformation: dict[str, Any] = field(default_factory=dict, repr=False)  # the translated template
    cloudformation_cycle: list[str] = field(default_factory=list)  # resources CloudFormation finds circular
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
    """Translate ``template_path`` (SAM) and create (or update) every supported resource.

    Clients honour ``endpoint_url`` or, unset, ``AWS_ENDPOINT_URL`` (boto3 itself), so this
    works against in-process ``mock_aws`` and against the embedded server alike.
    """
    template_path = Path(template_path).resolve()
    source = load_template(template_path)
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
    ctx.parameters = resolve_parameters(source.get("Parameters"), parameter_overrides)
    translated = translate(
        source,
        region=region,
        parameter_values={k: v for k, v in (parameter_overrides or {}).items()},
        managed_policy_map=aws_managed_policy_map(stack.client("iam")),
    )
    template = translated.template
    stack.cloudformation = template
    ctx.mappings = template.get("Mappings") or {}
    evaluate_conditions(template.get("Conditions"), ctx)

    lambda_runtime.install()
    deployer = _Deployer(stack, ctx, template, template_path.parent, translated.events, translated.renamed)
    deployer.run()
    return stack


# --- the work -------------------------------------------------------------------------


class _Deployer:
    def __init__(
        self,
        stack: DeployedStack,
        ctx: Context,
        template: dict[str, Any],
        base: Path,
        sam_events: dict[str, tuple[str, str]],
        renamed: dict[str, str],
    ) -> None:
        self.stack = stack
        self.ctx = ctx
        self.base = base
        self.sam_events = sam_events
        self.renamed = renamed
        self.resources: dict[str, dict[str, Any]] = {}
        for lid, res in (template.get("Resources") or {}).items():
            cond = res.get("Condition")
            if cond and not ctx.conditions.get(cond, False):
                stack.skipped[lid] = f"condition {cond} is false"
                continue
            self.resources[lid] = res
        self.outputs = template.get("Outputs") or {}
        self.layer_dirs: dict[str, Path] = {}  # layer version ARN -> python dir
        self.s3_notifications: dict[str, Any] = {}  # bucket -> its NotificationConfiguration (CFN)
        self.apis: dict[str, dict[str, Any]] = {}  # RestApi logical id -> its OpenAPI body
        self._clients: dict[str, Any] = {}
        self._zip = _placeholder_zip()

    def client(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = self.stack.client(service)
        return self._clients[service]

    def run(self) -> None:
        creators: dict[str, Callable[[str, dict[str, Any]], None]] = {
            "AWS::IAM::Role": self._role,
            "AWS::IAM::Policy": self._policy,
            "AWS::IAM::ManagedPolicy": self._managed_policy,
            "AWS::Lambda::LayerVersion": self._layer,
            "AWS::Lambda::Function": self._function,
            "AWS::Lambda::Permission": self._permission,
            "AWS::StepFunctions::StateMachine": self._state_machine,
            "AWS::S3::Bucket": self._bucket,
            "AWS::DynamoDB::Table": self._table,
            "AWS::Events::Rule": self._events_rule,
            "AWS::Events::EventBus": self._event_bus,
            "AWS::Scheduler::Schedule": self._scheduler_schedule,
            "AWS::ECS::Cluster": self._ecs_cluster,
            "AWS::ECS::TaskDefinition": self._ecs_task_definition,
            "AWS::ApiGateway::RestApi": self._rest_api,
        }
        self._cycles_cloudformation_rejects()
        for lid in self._order():
            res = self.resources[lid]
            rtype = str(res.get("Type"))
            creator = creators.get(rtype)
            if creator is None:
                self._skip(lid, rtype)
                continue
            try:
                creator(lid, res.get("Properties") or {})
            except (ClientError, IntrinsicError, OSError, KeyError, ValueError, layer_build.LayerBuildError) as exc:
                raise DeployError(f"{lid} ({rtype}): {exc}") from exc
        self._apply_s3_notifications()
        self._routes()
        self._outputs()

    # -- ordering and placeholders --

    def _order(self) -> list[str]:
        deps: dict[str, set[str]] = {}
        for lid, res in self.resources.items():
            depends_on = res.get("DependsOn") or []
            depends_on = [depends_on] if isinstance(depends_on, str) else list(depends_on)
            props = res.get("Properties") or {}
            if res.get("Type") == "AWS::S3::Bucket" and "NotificationConfiguration" in props:
                # Notifications are applied after everything else, so the bucket need not wait
                # for its functions. CloudFormation has no such escape: see _cycles_cloudformation_rejects.
                props = {k: v for k, v in props.items() if k != "NotificationConfiguration"}
                depends_on = [d for d in depends_on if self.resources.get(d, {}).get("Type") != _PERMISSION]
            found = references(props) | set(depends_on)
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

    def _cycles_cloudformation_rejects(self) -> None:
        """Warn about a circular dependency: ``sam deploy`` fails on it, this deployer does not.

        The classic one: a function with an S3 event on a bucket it also names (Ref) in its
        environment or policies (bucket -> permission -> function -> bucket).
        """
        deps: dict[str, set[str]] = {}
        for lid, res in self.resources.items():
            depends_on = res.get("DependsOn") or []
            depends_on = [depends_on] if isinstance(depends_on, str) else list(depends_on)
            found = references(res.get("Properties") or {}) | set(depends_on)
            deps[lid] = {d for d in found if d in self.resources and d != lid}
        done: set[str] = set()
        while True:
            ready = {lid for lid in deps if lid not in done and deps[lid] <= done}
            if not ready:
                break
            done |= ready
        cyclic = sorted(set(deps) - done)
        if cyclic:
            self.stack.cloudformation_cycle = cyclic
            LOG.warning("CloudFormation would reject this template: circular dependency involving %s", cyclic)

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

    # -- IAM: exactly the translated roles and policies --

    def _role(self, lid: str, raw_props: dict[str, Any]) -> None:
        props = resolve(raw_props, self.ctx)
        name = self._name(lid, raw_props, "RoleName")
        iam = self.client("iam")
        trust = json.dumps(props["AssumeRolePolicyDocument"])
        try:
            arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust, Path=props.get("Path", "/"))["Role"][
                "Arn"
            ]
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "EntityAlreadyExists":
                raise
            iam.update_assume_role_policy(RoleName=name, PolicyDocument=trust)
            arn = iam.get_role(RoleName=name)["Role"]["Arn"]
        # A re-deploy converges on the template: stale inline / managed policies go.
        wanted_inline = {p["PolicyName"]: _versioned(p["PolicyDocument"]) for p in props.get("Policies") or []}
        for old in iam.list_role_policies(RoleName=name)["PolicyNames"]:
            if old not in wanted_inline and not self._policy_resource_named(old):
                iam.delete_role_policy(RoleName=name, PolicyName=old)
        for policy_name, document in wanted_inline.items():
            iam.put_role_policy(RoleName=name, PolicyName=policy_name, PolicyDocument=json.dumps(document))
        wanted_managed = [str(a) for a in props.get("ManagedPolicyArns") or []]
        for attached in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]:
            if attached["PolicyArn"] not in wanted_managed:
                iam.detach_role_policy(RoleName=name, PolicyArn=attached["PolicyArn"])
        for policy_arn in wanted_managed:
            iam.attach_role_policy(RoleName=name, PolicyArn=policy_arn)
        self.ctx.refs[lid] = name
        self.ctx.attrs[(lid, "Arn")] = arn
        self.ctx.attrs[(lid, "RoleId")] = name
        self.stack.roles[lid] = arn

    def _policy_resource_named(self, policy_name: str) -> bool:
        # AWS::IAM::Policy resources are inline policies too: the role's sweep keeps them.
        for res in self.resources.values():
            props = res.get("Properties") or {}
            if res.get("Type") == "AWS::IAM::Policy" and resolve(props.get("PolicyName"), self.ctx) == policy_name:
                return True
        return False

    def _policy(self, lid: str, raw_props: dict[str, Any]) -> None:
        # AWS::IAM::Policy is an inline policy put on each of its roles/users/groups.
        props = resolve(raw_props, self.ctx)
        iam = self.client("iam")
        document = json.dumps(_versioned(props["PolicyDocument"]))
        name = str(props["PolicyName"])
        for role in props.get("Roles") or []:
            iam.put_role_policy(RoleName=str(role), PolicyName=name, PolicyDocument=document)
        for user in props.get("Users") or []:
            iam.put_user_policy(UserName=str(user), PolicyName=name, PolicyDocument=document)
        for group in props.get("Groups") or []:
            iam.put_group_policy(GroupName=str(group), PolicyName=name, PolicyDocument=document)
        self.ctx.refs[lid] = f"{self.stack.stack_name}-{lid}"

    def _managed_policy(self, lid: str, raw_props: dict[str, Any]) -> None:
        props = resolve(raw_props, self.ctx)
        iam = self.client("iam")
        name = self._name(lid, raw_props, "ManagedPolicyName", 128)
        arn = f"arn:{self.ctx.partition}:iam::{self.stack.account_id}:policy/{name}"
        document = json.dumps(_versioned(props["PolicyDocument"]))
        try:
            iam.create_policy(PolicyName=name, PolicyDocument=document)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "EntityAlreadyExists":
                raise
            for version in iam.list_policy_versions(PolicyArn=arn)["Versions"]:
                if not version["IsDefaultVersion"]:
                    iam.delete_policy_version(PolicyArn=arn, VersionId=version["VersionId"])
            iam.create_policy_version(PolicyArn=arn, PolicyDocument=document, SetAsDefault=True)
        for role in props.get("Roles") or []:
            iam.attach_role_policy(RoleName=str(role), PolicyArn=arn)
        self.ctx.refs[lid] = arn

    # -- layers and functions --

    def _layer(self, lid: str, props: dict[str, Any]) -> None:
        name = self._name(lid, props, "LayerName", 140)
        root = local_path(props.get("Content"), self.base)
        python_dir: Path | None = None
        if root is not None and (self.resources[lid].get("Metadata") or {}).get("BuildMethod") == "makefile":
            root = layer_build.build_layer(root, self.renamed.get(lid, lid))  # as `sam build` does
        if root is not None:
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
        self.stack.layers[self.renamed.get(lid, lid)] = arn
        if python_dir is not None and python_dir.is_dir():  # e.g. a sam-build-only layer is absent
            self.layer_dirs[arn] = python_dir

    def _function(self, lid: str, raw_props: dict[str, Any]) -> None:
        props = resolve(raw_props, self.ctx)
        name = self._name(lid, raw_props, "FunctionName")
        code_dir = local_path(props.get("Code"), self.base)
        if code_dir is None:
            LOG.warning("%s: Code is not a local directory; invoking it will fail locally", lid)
        handler = str(props.get("Handler", "app.lambda_handler"))
        env = {k: _env_text(v) for k, v in ((props.get("Environment") or {}).get("Variables") or {}).items()}
        timeout = int(props.get("Timeout", 3))
        memory = int(props.get("MemorySize", 128))
        layers = [str(arn) for arn in props.get("Layers") or []]
        role = str(props["Role"])
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
            role_arn=role,
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

    def _permission(self, lid: str, raw_props: dict[str, Any]) -> None:
        # The resource policy S3 / EventBridge / API Gateway invoke through.
        props = resolve(raw_props, self.ctx)
        args: dict[str, Any] = {
            "FunctionName": str(props["FunctionName"]),
            "StatementId": lid,
            "Action": str(props["Action"]),
            "Principal": str(props["Principal"]),
        }
        for key in ("SourceArn", "SourceAccount"):
            if props.get(key):
                args[key] = str(props[key])
        try:
            self.client("lambda").add_permission(**args)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ResourceConflictException":
                raise
        self.ctx.refs[lid] = lid

    def _apply_s3_notifications(self) -> None:
        s3 = self.client("s3")
        for bucket, raw in self.s3_notifications.items():
            configs: list[dict[str, Any]] = []
            for config in resolve(raw, self.ctx).get("LambdaConfigurations") or []:
                api: dict[str, Any] = {"LambdaFunctionArn": str(config["Function"]), "Events": [str(config["Event"])]}
                rules = ((config.get("Filter") or {}).get("S3Key") or {}).get("Rules")
                if rules:  # CFN spells it S3Key.Rules, the S3 API Key.FilterRules
                    api["Filter"] = {"Key": {"FilterRules": rules}}
                configs.append(api)
            # Note: moto delivers these synchronously, inside the PutObject call.
            s3.put_bucket_notification_configuration(
                Bucket=bucket, NotificationConfiguration={"LambdaFunctionConfigurations": configs}
            )

    # -- the API: routes for the local HTTP front (moto has no API Gateway -> Lambda) --

    def _rest_api(self, lid: str, raw_props: dict[str, Any]) -> None:
        props = raw_props
        name = self._name(lid, raw_props, "Name", 128)  # moto requires a Name; SAM's implicit API has none
        apigw = self.client("apigateway")
        found = [api["id"] for api in apigw.get_rest_apis(limit=500)["items"] if api["name"] == name]
        api_id = found[0] if found else apigw.create_rest_api(name=name)["id"]
        self.ctx.refs[lid] = api_id
        self.ctx.attrs[(lid, "RootResourceId")] = apigw.get_resources(restApiId=api_id)["items"][0]["id"]
        self.apis[lid] = props.get("Body") or {}

    def _routes(self) -> None:
        by_arn = {fn.arn: lid for lid, fn in self.stack.functions.items()}
        for api_lid, body in self.apis.items():
            for path, methods in (body.get("paths") or {}).items():
                for method, spec in methods.items():
                    integration = spec.get("x-amazon-apigateway-integration") or {}
                    try:
                        uri = str(resolve(integration.get("uri"), self.ctx))
                    except IntrinsicError:
                        continue
                    fn_arn = uri.split("/functions/", 1)[-1].removesuffix("/invocations")
                    fn_lid = by_arn.get(fn_arn)
                    if fn_lid is None:
                        continue
                    verb = "ANY" if method == "x-amazon-apigateway-any-method" else method.upper()
                    self.stack.routes.append(
                        RouteInfo(verb, str(path), fn_lid, self.stack.functions[fn_lid].name, api_lid)
                    )

    # -- schedules: moto never fires them; cachevault_tools/local/schedules.py does --

    def _schedule_name(self, lid: str, props: dict[str, Any]) -> tuple[str, str]:
        """(name, event id): a SAM event keeps ``<stack>-<Resource>-<Event>`` unless named."""
        if lid in self.sam_events:
            resource, event_id = self.sam_events[lid]
            sam_name = (self._sam_event_props(resource, event_id)).get("Name")
            name = str(resolve(sam_name, self.ctx)) if sam_name else f"{self.stack.stack_name}-{resource}-{event_id}"
            return name[:64], event_id
        return self._name(lid, props, "Name"), lid

    def _sam_event_props(self, resource: str, event_id: str) -> dict[str, Any]:
        source = load_template(self.stack.template_path)["Resources"][resource]
        return ((source.get("Properties") or {}).get("Events") or {})[event_id].get("Properties") or {}

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

    def _mirror_scheduler(self, info: ScheduleInfo, role_arn: str = "") -> None:
        scheduler = self.client("scheduler")
        target: dict[str, Any] = {"Arn": info.target_arn, "RoleArn": role_arn or self._any_role()}
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

    # -- ECS (tasks run as local processes: cachevault_tools.local.ecs) --

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

    def _any_role(self) -> str:
        return next(iter(self.stack.roles.values()), f"arn:{self.ctx.partition}:iam::{self.stack.account_id}:role/none")

    def _event_bus(self, lid: str, raw_props: dict[str, Any]) -> None:
        name = self._name(lid, raw_props, "Name", 256)
        events = self.client("events")
        try:
            events.describe_event_bus(Name=name)
        except ClientError:
            events.create_event_bus(Name=name)
        # Ref of an EventBus is its name (moto's CloudFormation returns an object).
        self.ctx.refs[lid] = name
        self.ctx.attrs[(lid, "Arn")] = (
            f"arn:{self.ctx.partition}:events:{self.stack.region}:{self.stack.account_id}:event-bus/{name}"
        )
        self.ctx.attrs[(lid, "Name")] = name

    def _events_rule(self, lid: str, raw_props: dict[str, Any]) -> None:
        props = resolve(raw_props, self.ctx)
        name, event_id = self._schedule_name(lid, raw_props)
        arn = f"arn:{self.ctx.partition}:events:{self.stack.region}:{self.stack.account_id}:rule/{name}"
        self.ctx.refs[lid] = name
        self.ctx.attrs[(lid, "Arn")] = arn
        expression = props.get("ScheduleExpression")
        if not expression:
            self.stack.skipped[lid] = "event-pattern rules are not emulated locally"
            return
        targets = props.get("Targets") or []
        for target in targets:
            target_arn = str(target["Arn"])
            info = ScheduleInfo(
                name=name if len(targets) == 1 else f"{name}-{target.get('Id', 'target')}",
                logical_id=self._logical_for_arn(target_arn),
                expression=str(expression),
                target_arn=target_arn,
                input=None if target.get("Input") is None else _json_text(target["Input"]),
                event_id=event_id,
                kind="Schedule",
                enabled=_schedule_enabled(props),
            )
            self._register_schedule(info)

    def _scheduler_schedule(self, lid: str, raw_props: dict[str, Any]) -> None:
        props = resolve(raw_props, self.ctx)
        name, event_id = self._schedule_name(lid, {k: v for k, v in raw_props.items() if lid not in self.sam_events})
        self.ctx.refs[lid] = name
        target = props.get("Target") or {}
        target_arn = str(target.get("Arn", ""))
        info = ScheduleInfo(
            name=name,
            logical_id=self._logical_for_arn(target_arn),
            expression=str(props["ScheduleExpression"]),
            target_arn=target_arn,
            input=None if target.get("Input") is None else _json_text(target["Input"]),
            event_id=event_id,
            kind="ScheduleV2",
            enabled=_schedule_enabled(props),
        )
        self.stack.schedules = [s for s in self.stack.schedules if s.name != info.name]
        self.stack.schedules.append(info)
        try:
            self._mirror_scheduler(info, str(target.get("RoleArn", "")))
        except ClientError as exc:
            LOG.info("could not mirror schedule %s in moto: %s", info.name, exc)

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
        name = self._name(lid, raw_props, "StateMachineName", 80)
        definition = self._definition(lid, props)
        role_arn = str(resolve(props["RoleArn"], self.ctx))
        sm_type = str(props.get("StateMachineType", "STANDARD"))
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
        self.stack.state_machine_roles[lid] = role_arn

    def _definition(self, lid: str, props: dict[str, Any]) -> str:
        # moto ignores DefinitionS3Location and DefinitionSubstitutions: both are applied here.
        if props.get("DefinitionS3Location") is not None:
            path = local_path(props["DefinitionS3Location"], self.base)
            if path is None:
                raise DeployError(f"{lid}: only a local definition file is supported")
            text = path.read_text(encoding="utf-8")
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
        props = resolve({k: v for k, v in raw_props.items() if k != "NotificationConfiguration"}, self.ctx)
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
        notifications = raw_props.get("NotificationConfiguration")
        if notifications:  # resolved once the functions exist (_apply_s3_notifications)
            self.s3_notifications[name] = notifications

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


def _versioned(document: dict[str, Any]) -> dict[str, Any]:
    """SAM's policy templates carry no ``Version``; IAM accepts that (as 2008-10-17),
    moto's validator does not. Same statements; the versions differ only in policy
    variables, which none of these documents use."""
    return document if "Version" in document else {"Version": "2012-10-17", **document}


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
