"""IAM enforced by the embedded AWS: an admin identity, role credentials, moto's seams.

moto checks every request signed with an IAM user's or an assumed role's keys against
that identity's policies once ``settings.INITIAL_NO_AUTH_ACTION_COUNT`` is reached
(moto/core/authorization.py); :func:`enforce` sets it to 0. Then:

* the CLI, tests and the deployer use an admin user's keys (:func:`create_admin`), the
  stand-in for the person or pipeline that runs ``sam deploy``;
* every Lambda invocation runs with its function role's credentials
  (:func:`role_credentials`, STS AssumeRole as Lambda does), Step Functions tasks with
  the state machine role's (:func:`install_seams`), so a missing permission in
  template.yaml is ``AccessDenied`` locally too.

moto's authorization gets some of our calls wrong; :func:`install_seams` fixes exactly
these (moto 5.2.1, pinned):

* most services authorize against resource ``*`` (only IAM, SQS and STS name the
  resource), so a statement scoped to a table / state machine / secret / task never matches:
  the resource ARN is derived from the request for the services cachevault calls;
* Lambda's REST operation ``Invoke`` is checked as ``lambda:Invoke`` and S3's HeadBucket
  as ``s3:HeadBucket``; IAM's actions are ``lambda:InvokeFunction`` and ``s3:ListBucket``;
* a trust policy naming a service principal (``lambda.amazonaws.com``) makes moto's
  trust check raise; the admin identity, standing in for the AWS service that assumes
  the role, is trusted where the trust policy names a service;
* a REST GET/DELETE with a query string fails moto's signature check (it signs the
  query parameters again as a form body), and so does a path or query the server has
  already URL-decoded (an ARN in Lambda's path, ``Prefix=a/b/``) but the client signed quoted;
* moto's Step Functions interpreter calls Lambda with fixed keys ``ak``/``sk``: its
  clients get the execution role's credentials instead.

One switch: ``CACHEVAULT_LOCAL_IAM=off`` turns enforcement off (default: enforced).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote

import boto3

LOG = logging.getLogger(__name__)
ENFORCE_ENV = "CACHEVAULT_LOCAL_IAM"
ADMIN_USER = "cachevault-local-admin"
_ADMIN_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
_CREDENTIAL_TTL_S = 3600
_REFRESH_MARGIN_S = 300

_lock = threading.Lock()
_cache: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}
_admin_key_ids: set[str] = set()
_seams: dict[str, Any] = {}


def enforcement_wanted() -> bool:
    return os.environ.get(ENFORCE_ENV, "enforce").strip().lower() not in ("off", "0", "false", "no")


def enforce(on: bool) -> None:
    """Turn moto's IAM checks on (every request) or off (process-wide)."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0 if on else float("inf")
    ActionAuthenticatorMixin.request_count = 0


def create_admin(session: boto3.Session, endpoint_url: str | None = None) -> dict[str, str]:
    """An IAM user allowed everything, with a fresh access key (env-variable names -> values)."""
    iam = session.client("iam", endpoint_url=endpoint_url)
    with contextlib.suppress(iam.exceptions.EntityAlreadyExistsException):
        iam.create_user(UserName=ADMIN_USER)
    iam.put_user_policy(UserName=ADMIN_USER, PolicyName="administrator", PolicyDocument=json.dumps(_ADMIN_POLICY))
    key = iam.create_access_key(UserName=ADMIN_USER)["AccessKey"]
    _admin_key_ids.add(key["AccessKeyId"])
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def role_credentials(session: boto3.Session, role_arn: str, endpoint_url: str | None = None) -> dict[str, str]:
    """Credentials of ``role_arn`` as Lambda gives a function (STS AssumeRole), as env variables.

    Cached per role until shortly before they expire, so concurrent invocations of one
    function see identical environments.
    """
    key = (role_arn, endpoint_url or "")
    # One AssumeRole per role at a time: concurrent first invocations (a Map) get the same keys.
    with _lock:
        now = time.time()
        cached = _cache.get(key)
        if cached and cached[0] - _REFRESH_MARGIN_S > now:
            return dict(cached[1])
        sts = session.client("sts", endpoint_url=endpoint_url)
        session_name = role_arn.rsplit("/", 1)[-1][:64]
        creds = sts.assume_role(RoleArn=role_arn, RoleSessionName=session_name, DurationSeconds=_CREDENTIAL_TTL_S)[
            "Credentials"
        ]
        env = {
            "AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
            "AWS_SESSION_TOKEN": creds["SessionToken"],
        }
        _cache[key] = (now + _CREDENTIAL_TTL_S, env)
        return dict(env)


def forget_credentials() -> None:
    """Drop cached role credentials (the embedded AWS was reset)."""
    with _lock:
        _cache.clear()


# --- moto seams -----------------------------------------------------------------------


def install_seams(admin_session: Callable[[], boto3.Session]) -> None:
    """Patch moto's authorization where it gets our calls wrong (idempotent).

    ``admin_session`` (the current embedded AWS's admin) replaces the previous one.
    """
    _seams["admin_session"] = admin_session
    if "iam" in _seams:
        return
    from moto.iam import access_control

    original_init = access_control.IAMRequestBase.__init__
    original_trust = access_control.IAMRequestBase._check_role_trust_relationship

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._action = _IAM_ACTION_NAMES.get(self._action, self._action)

    def trust(self: Any, role_arn: str) -> bool:
        if getattr(self._access_key, "_access_key_id", None) in _admin_key_ids or _is_admin(self._access_key):
            role = self.backend.get_role_by_arn(role_arn)
            if _trusts_a_service(role.assume_role_policy_document):
                return True
        return bool(original_trust(self, role_arn))

    original_request = access_control.IAMRequestBase._create_aws_request

    def aws_request(self: Any) -> Any:
        request = original_request(self)
        if not self._body and self._method in ("GET", "HEAD", "DELETE"):
            request.data = b""  # the query string is in the URL already, not the signed payload
        path, sep, query = request.url.partition("?")
        if ":" in path:  # the server decoded a %3A-quoted ARN in the path; the client signed it quoted
            path = quote(path, safe="/~")
        if query:  # the server decoded the query too (Prefix=a/b/); SigV4 signs it quoted
            pairs = (pair.partition("=") for pair in query.split("&"))
            query = "&".join(f"{quote(unquote(k), safe='-_.~')}={quote(unquote(v), safe='-_.~')}" for k, _, v in pairs)
        request.url = path + sep + query
        return request

    original_check = access_control.IAMRequestBase.check_action_permitted

    def check(self: Any, resource: str) -> None:
        try:
            original_check(self, resource)
        except Exception:
            # What AWS would put in CloudTrail: the identity, the action, the resource.
            LOG.warning("AccessDenied: %s %s on %s", getattr(self._access_key, "arn", "?"), self._action, resource)
            raise

    access_control.IAMRequestBase.check_action_permitted = check  # type: ignore[method-assign]
    access_control.IAMRequestBase._create_aws_request = aws_request  # type: ignore[method-assign]
    access_control.IAMRequestBase.__init__ = init  # type: ignore[method-assign]
    access_control.IAMRequestBase._check_role_trust_relationship = trust  # type: ignore[method-assign]
    _seams["iam"] = (original_init, original_trust)
    _install_resource_seam()
    _install_state_machine_credentials()


def _is_admin(access_key: Any) -> bool:
    return str(getattr(access_key, "arn", "")).endswith(f":user/{ADMIN_USER}")


def _trusts_a_service(document: Any) -> bool:
    doc = json.loads(document) if isinstance(document, str) else document
    for statement in doc.get("Statement", []):
        principal = statement.get("Principal") or {}
        if statement.get("Effect") == "Allow" and isinstance(principal, dict) and "Service" in principal:
            return True
    return False


# IAM action names where moto's operation name differs: Lambda's Invoke is authorized as
# lambda:InvokeFunction, S3's HeadBucket as s3:ListBucket (there is no s3:HeadBucket action).
_IAM_ACTION_NAMES = {"lambda:Invoke": "lambda:InvokeFunction", "s3:HeadBucket": "s3:ListBucket"}


def _install_resource_seam() -> None:
    from moto.awslambda.responses import LambdaResponse
    from moto.dynamodb.responses import DynamoHandler
    from moto.ecs.responses import EC2ContainerServiceResponse
    from moto.events.responses import EventsHandler
    from moto.kms.responses import KmsResponse
    from moto.secretsmanager.responses import SecretsManagerResponse
    from moto.ssm.responses import SimpleSystemManagerResponse
    from moto.stepfunctions.responses import StepFunctionResponse

    for cls, fn in (
        (DynamoHandler, _dynamodb_resource),
        (StepFunctionResponse, _states_resource),
        (EventsHandler, _events_resource),
        (SecretsManagerResponse, _secret_resource),
        (SimpleSystemManagerResponse, _ssm_resource),
        (KmsResponse, _kms_resource),
        (LambdaResponse, _lambda_resource),
        (EC2ContainerServiceResponse, _ecs_resource),
    ):
        cls._determine_resource = fn  # type: ignore[attr-defined]


def _body(self: Any) -> dict[str, Any]:
    for parsed in (getattr(self, "params", None), self.body):
        if isinstance(parsed, dict) and parsed:
            return parsed
    try:
        data = json.loads(self.body or "{}")
    except (TypeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _arn(self: Any, service: str, resource: str) -> str:
    return f"arn:aws:{service}:{self.region}:{self.current_account}:{resource}"


def _dynamodb_resource(self: Any) -> str:
    body = _body(self)
    table = body.get("TableName")
    if table is None:
        # Batch/transaction calls name several tables; the first is checked (moto takes one resource).
        items = body.get("RequestItems") or {}
        table = next(iter(items), None)
        for item in body.get("TransactItems") or []:
            for op in item.values():
                table = table or op.get("TableName")
    if not table:
        return "*"
    if str(table).startswith("arn:"):
        return str(table)
    arn = _arn(self, "dynamodb", f"table/{table}")
    return f"{arn}/index/{body['IndexName']}" if body.get("IndexName") else arn


def _states_resource(self: Any) -> str:
    body = _body(self)
    for key in ("stateMachineArn", "executionArn", "resourceArn"):
        if body.get(key):
            return str(body[key])
    return "*"


def _events_resource(self: Any) -> str:
    body = _body(self)
    entries = body.get("Entries") or []
    bus = (entries[0].get("EventBusName") if entries else None) or body.get("EventBusName") or body.get("Name")
    if self._get_action() in ("PutEvents", "DescribeEventBus", "CreateEventBus", "DeleteEventBus"):
        bus = bus or "default"
        return str(bus) if str(bus).startswith("arn:") else _arn(self, "events", f"event-bus/{bus}")
    return "*"


def _secret_resource(self: Any) -> str:
    secret = _body(self).get("SecretId") or _body(self).get("Name")
    if not secret:
        return "*"
    return str(secret) if str(secret).startswith("arn:") else _arn(self, "secretsmanager", f"secret:{secret}")


def _ssm_resource(self: Any) -> str:
    name = _body(self).get("Name")
    if not name:
        return "*"
    return str(name) if str(name).startswith("arn:") else _arn(self, "ssm", f"parameter/{str(name).lstrip('/')}")


def _kms_resource(self: Any) -> str:
    key = _body(self).get("KeyId")
    if not key:
        return "*"
    return str(key) if str(key).startswith("arn:") else _arn(self, "kms", f"key/{key}")


def _lambda_resource(self: Any) -> str:
    path = str(getattr(self, "raw_path", "") or getattr(self, "path", ""))
    marker = "/functions/"
    if marker not in path:
        return "*"
    name = path.split(marker, 1)[1].split("/", 1)[0]
    from urllib.parse import unquote

    name = unquote(name).split(":")[-1] if unquote(name).startswith("arn:") else unquote(name)
    return _arn(self, "lambda", f"function:{name}")


def _ecs_resource(self: Any) -> str:
    """The resource IAM authorizes an ECS call on (the Service Authorization Reference's)."""
    body = _body(self)
    action = self._get_action()
    cluster = str(body.get("cluster") or "default").rsplit("cluster/", 1)[-1]
    if action in ("RunTask", "StartTask") and body.get("taskDefinition"):
        definition = str(body["taskDefinition"])
        with contextlib.suppress(Exception):  # a family alone means its latest revision
            return str(self.ecs_backend.describe_task_definition(definition).arn)
        return definition if definition.startswith("arn:") else _arn(self, "ecs", f"task-definition/{definition}")
    if action in ("DescribeTasks", "StopTask"):
        # DescribeTasks names several tasks; the first is checked (moto takes one resource).
        task = body.get("task") or next(iter(body.get("tasks") or []), None)
        if task:
            return str(task) if str(task).startswith("arn:") else _arn(self, "ecs", f"task/{cluster}/{task}")
    if action == "ListTasks":
        # Authorized on the cluster's container instances (there is no task resource yet).
        return _arn(self, "ecs", f"container-instance/{cluster}/*")
    return "*"


def _install_state_machine_credentials() -> None:
    """moto's ASL interpreter signs its calls with ``ak``/``sk``: use the execution role's keys."""
    import importlib

    from moto.stepfunctions.parser.asl.utils import boto_client

    original = boto_client.boto_client_for

    def boto_client_for(region: str, service: str, state_credentials: Any = None) -> Any:
        client = original(region=region, service=service, state_credentials=state_credentials)
        role_arn = getattr(state_credentials, "role_arn", None)
        if not role_arn:
            return client
        endpoint = None if "localhost" not in client.meta.endpoint_url else client.meta.endpoint_url
        creds = role_credentials(_seams["admin_session"](), str(role_arn), endpoint)
        return boto3.client(
            service,
            region_name=region,
            endpoint_url=endpoint,
            aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
            aws_session_token=creds["AWS_SESSION_TOKEN"],
            config=client.meta.config,
        )

    prefix = "moto.stepfunctions.parser.asl.component.state.exec.state_task."
    for module_name in (
        prefix + "lambda_eval_utils",
        prefix + "service.state_task_service_sfn",
        prefix + "service.state_task_service_events",
        prefix + "service.state_task_service_dynamodb",
        prefix + "service.state_task_service_ecs",
        prefix + "service.state_task_service_aws_sdk",
    ):
        module = importlib.import_module(module_name)
        if hasattr(module, "boto_client_for"):
            module.boto_client_for = boto_client_for  # type: ignore[attr-defined]
    boto_client.boto_client_for = boto_client_for  # type: ignore[assignment]
