"""Runs the real Lambda handlers from ``functions/`` inside moto, with no Docker.

moto's Lambda executes code in a container; here its private
``LambdaFunction._invoke_lambda`` is replaced by an in-process call of the handler the
template declares (moto is pinned to 5.2.1 for this reason; this is the ONLY module that
touches moto internals). Everything that reaches a function goes through that seam:
``lambda.invoke`` from boto3, Step Functions Task states (moto's ASL interpreter calls
``lambda.invoke`` and takes the state error name from the payload's ``errorType``, so
``Retry``/``Catch`` on ``FlakyError`` match the exception class name, as on AWS) and S3
notifications.

The handler sees what a Lambda sees: its environment variables (template + Globals +
the standard ``AWS_LAMBDA_*`` ones), a context object, warm-start module state. Because
``os.environ`` is process-wide, invocations whose environments differ are serialized;
concurrent invocations of the same function (a Map state) share one environment and run
in parallel.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandlerSpec:
    """Where a function's code lives: what moto cannot know (it only has a zip)."""

    function_name: str
    code_dir: Path
    handler: str  # "app.lambda_handler" -> <code_dir>/app.py, attribute lambda_handler
    layer_dirs: tuple[Path, ...] = ()  # each layer's python/ dir (what Lambda puts in /opt/python)


@dataclass(frozen=True)
class FunctionConfig:
    """What moto knows about the function at invoke time (env may have been updated)."""

    function_name: str
    arn: str
    region: str
    timeout: int
    memory_mb: int
    env: Mapping[str, str]
    runtime: str = "python3.11"
    version: str = "$LATEST"


@dataclass(frozen=True)
class InvocationResult:
    payload: str  # JSON text Lambda would return
    errored: bool
    logs: str
    duration_s: float


class LambdaContext:
    """The subset of the Lambda context object handlers and Powertools read."""

    def __init__(self, config: FunctionConfig, request_id: str, started: float) -> None:
        self.function_name = config.function_name
        self.function_version = config.version
        self.invoked_function_arn = config.arn
        self.memory_limit_in_mb = config.memory_mb
        self.aws_request_id = request_id
        self.log_group_name = f"/aws/lambda/{config.function_name}"
        self.log_stream_name = time.strftime("%Y/%m/%d/[$LATEST]") + request_id.replace("-", "")
        self.identity = None
        self.client_context = None
        self.tenant_id = None
        self._deadline = started + config.timeout

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class EnvConflictTimeout(RuntimeError):
    """Another invocation with a different environment kept running past our timeout."""


class _EnvGate:
    """Applies an invocation's environment to ``os.environ`` for its duration.

    Invocations with an identical overlay share it (parallel Map iterations of one
    function); a different overlay waits until the current one is released. A nested
    invocation on the same thread (a handler calling ``lambda.invoke`` in-process) is
    stacked on top instead of waiting, which would deadlock.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active: tuple[tuple[str, str | None], ...] | None = None
        self._users = 0
        self._saved: dict[str, str | None] = {}
        self._local = threading.local()

    @contextlib.contextmanager
    def applied(self, overlay: Mapping[str, str | None], timeout: float) -> Iterator[None]:
        key = tuple(sorted(overlay.items()))
        depth = getattr(self._local, "depth", 0)
        if depth:
            saved = _apply(overlay)
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
                _restore(saved)
            return
        with self._cond:
            if not self._cond.wait_for(lambda: self._active in (None, key), timeout=timeout):
                raise EnvConflictTimeout(f"waited {timeout:.0f}s for a concurrent invocation with another environment")
            if self._active is None:
                self._saved = _apply(overlay)
                self._active = key
            self._users += 1
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._cond:
                self._users -= 1
                if self._users == 0:
                    _restore(self._saved)
                    self._active = None
                    self._cond.notify_all()


def _apply(overlay: Mapping[str, str | None]) -> dict[str, str | None]:
    saved = {name: os.environ.get(name) for name in overlay}
    _restore(overlay)
    return saved


def _restore(values: Mapping[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@dataclass
class LambdaRuntime:
    """Registry of handlers plus the invoke path moto is patched to call."""

    # Environment every handler gets on top of the process's (None = unset), e.g. the
    # server endpoint in server mode, or AWS_ENDPOINT_URL removed in in-process mode so
    # handler clients stay inside mock_aws.
    base_env: dict[str, str | None] = field(default_factory=dict)
    # Report an invocation that ran past its template Timeout as Lambda does. The
    # handler cannot be killed in-process, so this is judged when it returns.
    enforce_timeout: bool = True
    _specs: dict[str, HandlerSpec] = field(default_factory=dict)
    _modules: dict[str, tuple[tuple[Any, ...], Callable[..., Any]]] = field(default_factory=dict)
    _load_lock: threading.RLock = field(default_factory=threading.RLock)
    _gate: _EnvGate = field(default_factory=_EnvGate)
    invocations: dict[str, int] = field(default_factory=dict)

    def register(self, spec: HandlerSpec) -> None:
        with self._load_lock:
            self._specs[spec.function_name] = spec
            self._modules.pop(spec.function_name, None)  # re-deploy = cold start

    def unregister(self, function_name: str) -> None:
        with self._load_lock:
            self._specs.pop(function_name, None)
            self._modules.pop(function_name, None)

    def registered(self) -> dict[str, HandlerSpec]:
        return dict(self._specs)

    def invoke(self, config: FunctionConfig, event: Any) -> InvocationResult:
        request_id = str(uuid.uuid4())
        started = time.monotonic()
        spec = self._specs.get(config.function_name)
        with self._load_lock:
            self.invocations[config.function_name] = self.invocations.get(config.function_name, 0) + 1
        if spec is None:
            return _error_result(
                "Runtime.HandlerNotFound",
                f"no local handler registered for {config.function_name} (deploy it with the local deployer)",
                [],
                request_id,
                started,
            )
        overlay = self._overlay(config, spec)
        try:
            with self._gate.applied(overlay, timeout=max(config.timeout, 1) + 5):
                handler = self._handler(spec)
                context = LambdaContext(config, request_id, started)
                result = handler(event, context)
        except EnvConflictTimeout as exc:
            return _error_result("Runtime.EnvConflict", str(exc), [], request_id, started)
        except Exception as exc:
            return _error_result(
                # tb_next: the trace starts in the handler, as Lambda's does, not in this frame
                type(exc).__name__,
                str(exc),
                _trace(exc),
                request_id,
                started,
            )
        elapsed = time.monotonic() - started
        if self.enforce_timeout and elapsed > config.timeout:
            return _error_result(
                "Sandbox.Timedout",
                f"{request_id} Task timed out after {config.timeout:.2f} seconds",
                [],
                request_id,
                started,
            )
        try:
            payload = json.dumps(result)
        except (TypeError, ValueError) as exc:
            return _error_result("Runtime.MarshalError", f"Unable to marshal response: {exc}", [], request_id, started)
        return InvocationResult(payload, False, _report(request_id, elapsed, config), elapsed)

    def _overlay(self, config: FunctionConfig, spec: HandlerSpec) -> dict[str, str | None]:
        overlay: dict[str, str | None] = dict(self.base_env)
        overlay.update(
            {
                "AWS_REGION": config.region,
                "AWS_DEFAULT_REGION": config.region,
                "AWS_EXECUTION_ENV": f"AWS_Lambda_{config.runtime}",
                "AWS_LAMBDA_FUNCTION_NAME": config.function_name,
                "AWS_LAMBDA_FUNCTION_VERSION": config.version,
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(config.memory_mb),
                "AWS_LAMBDA_FUNCTION_TIMEOUT": str(config.timeout),
                "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{config.function_name}",
                "LAMBDA_TASK_ROOT": str(spec.code_dir),
                "_HANDLER": spec.handler,
            }
        )
        overlay.update({k: str(v) for k, v in config.env.items()})
        return overlay

    def _handler(self, spec: HandlerSpec) -> Callable[..., Any]:
        module_rel, _, attr = spec.handler.rpartition(".")
        path = spec.code_dir.joinpath(*module_rel.split(".")).with_suffix(".py")
        stamp = (spec, path.stat().st_mtime_ns if path.exists() else 0)
        with self._load_lock:
            cached = self._modules.get(spec.function_name)
            if cached and cached[0] == stamp:
                return cached[1]
            module = _import_handler_module(spec, module_rel, path)
            handler = getattr(module, attr, None)
            if not callable(handler):
                raise AttributeError(f"handler {spec.handler} not found in {path}")
            self._modules[spec.function_name] = (stamp, handler)
            return handler


def _import_handler_module(spec: HandlerSpec, module_rel: str, path: Path) -> ModuleType:
    # A unique module name per function: every function's handler is called app.py.
    safe = re.sub(r"\W", "_", spec.function_name)
    name = f"_cvlambda_{safe}_{module_rel.replace('.', '_')}"
    for layer in spec.layer_dirs:
        # Layers are shared code (/opt/python): permanently importable, appended so an
        # installed copy of the same package keeps precedence in the dev venv.
        if str(layer) not in sys.path:
            sys.path.append(str(layer))
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot import handler module {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    # The code dir is first on sys.path while the module loads, as /var/task is in Lambda.
    sys.path.insert(0, str(spec.code_dir))
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(spec.code_dir))
    return module


def _trace(exc: BaseException) -> list[str]:
    tb = exc.__traceback__
    return traceback.format_tb(tb.tb_next if tb is not None and tb.tb_next is not None else tb)


def _error_result(error_type: str, message: str, stack: list[str], request_id: str, started: float) -> InvocationResult:
    elapsed = time.monotonic() - started
    payload = json.dumps(
        {"errorMessage": message, "errorType": error_type, "requestId": request_id, "stackTrace": stack}
    )
    logs = f"START RequestId: {request_id}\n[ERROR] {error_type}: {message}\nEND RequestId: {request_id}"
    return InvocationResult(payload, True, logs, elapsed)


def _report(request_id: str, elapsed: float, config: FunctionConfig) -> str:
    return (
        f"START RequestId: {request_id} Version: {config.version}\n"
        f"END RequestId: {request_id}\n"
        f"REPORT RequestId: {request_id}\tDuration: {elapsed * 1000:.2f} ms\t"
        f"Memory Size: {config.memory_mb} MB"
    )


RUNTIME = LambdaRuntime()

# --- the moto seam --------------------------------------------------------------------

_originals: dict[str, Any] = {}
_patch_lock = threading.Lock()


def install(runtime: LambdaRuntime = RUNTIME) -> None:
    """Route moto's Lambda execution to ``runtime`` (idempotent)."""
    from moto.awslambda.models import LambdaFunction

    with _patch_lock:
        if _originals:
            return
        _originals["_invoke_lambda"] = LambdaFunction._invoke_lambda
        _originals["invoke"] = LambdaFunction.invoke

        def _invoke_lambda(self: Any, event: Any = None) -> tuple[str, bool, str]:
            if isinstance(event, str | bytes):
                with contextlib.suppress(ValueError):
                    event = json.loads(event or "{}")
            config = FunctionConfig(
                function_name=self.function_name,
                arn=self.function_arn,
                region=self.region,
                timeout=int(self.timeout or 3),
                memory_mb=int(self.memory_size or 128),
                env=dict(self.environment_vars or {}),
                runtime=str(self.run_time or "python3.11"),
            )
            result = runtime.invoke(config, {} if event is None else event)
            _save_logs(self, result.logs)
            return result.payload, result.errored, result.logs

        def invoke(self: Any, body: Any, request_headers: Any, response_headers: Any) -> Any:
            out = _originals["invoke"](self, body, request_headers, response_headers)
            # moto labels every error "Handled"; an exception escaping the handler is
            # "Unhandled" on AWS, and that is the only kind this runtime produces.
            if response_headers.get("x-amz-function-error") == "Handled":
                response_headers["x-amz-function-error"] = "Unhandled"
            return out

        LambdaFunction._invoke_lambda = _invoke_lambda
        LambdaFunction.invoke = invoke
        _patch_state_machine_clone()
        _patch_dynamodb_item_atomicity()
        _patch_invoke_non_object_payload()


def uninstall() -> None:
    from moto.awslambda.models import LambdaFunction

    with _patch_lock:
        if not _originals:
            return
        LambdaFunction._invoke_lambda = _originals.pop("_invoke_lambda")
        LambdaFunction.invoke = _originals.pop("invoke")
        # The state-machine clone fix stays: it only repairs a moto bug.


def _patch_invoke_non_object_payload() -> None:
    """Fix moto 5.2.1: ``lambda invoke`` with a JSON array (or string) payload answers 500.

    ``Invoke`` reads its ``Qualifier`` with ``BaseResponse._get_param``, which also looks
    in the JSON body and indexes it by name: a list body raises TypeError there. Lambda
    accepts any JSON value as an event, so such a body is simply not a parameter source.
    """
    from moto.awslambda.responses import LambdaResponse

    if getattr(LambdaResponse, "_cachevault_payload_fix", False):
        return
    real = LambdaResponse._get_param

    def _get_param(self: Any, param_name: str, if_none: Any = None) -> Any:
        try:
            return real(self, param_name, if_none)
        except TypeError:
            body, self.body = self.body, None
            try:
                return real(self, param_name, if_none)
            finally:
                self.body = body

    LambdaResponse._get_param = _get_param
    LambdaResponse._cachevault_payload_fix = True


def _patch_state_machine_clone() -> None:
    """Fix moto 5.2.1: the second ``start_execution`` in a region raises TypeError.

    ``StartExecution`` deep-copies the state machine; that copy follows
    ``StateMachine.backend`` into every earlier execution, whose interpreter holds an
    RLock ("cannot pickle '_thread.RLock' object"). The copy only needs to freeze the
    definition and configuration, so the backend and the execution list are shared.
    """
    from moto.stepfunctions.models import StateMachineInstance

    if getattr(StateMachineInstance, "_cachevault_clone_fix", False):
        return

    def __deepcopy__(self: Any, memo: dict[int, Any]) -> Any:
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            if key == "backend":
                clone.__dict__[key] = value
            elif key == "executions":
                clone.__dict__[key] = list(value)
            else:
                clone.__dict__[key] = copy.deepcopy(value, memo)
        return clone

    StateMachineInstance.__deepcopy__ = __deepcopy__
    StateMachineInstance._cachevault_clone_fix = True


def _patch_dynamodb_item_atomicity() -> None:
    """Give moto 5.2.1's DynamoDB the per-item atomicity real DynamoDB has.

    ``DynamoDBBackend.update_item`` reads the item, evaluates the condition, then mutates
    it with nothing held in between: two threads (a Map state's branches, concurrent
    requests) could both pass a ``LockedBy not_exists`` condition, and a scan could iterate
    a dict another thread grows. One lock around every item operation restores DynamoDB's
    semantics, so the product's conditional writes mean locally what they mean on AWS.
    """
    from moto.dynamodb.models import DynamoDBBackend

    if getattr(DynamoDBBackend, "_cachevault_atomic", False):
        return
    lock = threading.RLock()
    for name in ("put_item", "update_item", "delete_item", "get_item", "query", "scan", "transact_write_items"):
        real = getattr(DynamoDBBackend, name)

        def locked(self: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            with lock:
                return _real(self, *args, **kwargs)

        setattr(DynamoDBBackend, name, locked)
    DynamoDBBackend._cachevault_atomic = True


def _save_logs(fn: Any, logs: str) -> None:
    # Best effort, like moto's own path: CloudWatch Logs under /aws/lambda/<name>.
    try:
        fn.logs_backend.ensure_log_group(fn.logs_group_name)
        fn.save_logs(logs)
    except Exception as exc:
        LOG.debug("could not store logs for %s: %s", fn.function_name, exc)
