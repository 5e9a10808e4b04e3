"""Runs the real Lambda handlers from ``functions/`` inside moto, with no Docker, as Lambda does.

moto's Lambda executes code in a container; here its private
``LambdaFunction._invoke_lambda`` is replaced by a call into :class:`LambdaRuntime`
(moto is pinned to 5.2.1 for this reason; this is the ONLY module that touches moto
internals). Everything that reaches a function goes through that seam: ``lambda.invoke``
from boto3, Step Functions Task states (moto's ASL interpreter takes the state error name
from the payload's ``errorType``, so ``Retry``/``Catch`` match the exception class name,
as on AWS) and S3 notifications.

Each function runs in execution environments of its own
(:class:`~cachevault_tools.local.lambda_sandbox.ExecutionEnvironment`: a worker process), reused
warm, one more started whenever every warm one is busy (Lambda's scaling: a Map state's
iterations run at the same time). An environment gets exactly the function's
environment (template ``Globals`` + its own ``Environment``, the ``AWS_LAMBDA_*``
variables, the embedded AWS endpoint, credentials of its role from STS ``AssumeRole``),
the code directory as working directory, and, per :class:`LambdaSemantics`: frozen
between invocations, everything but a private ``/tmp`` (``EphemeralStorage``) read-only,
``Timeout`` and ``MemorySize`` enforced with Lambda's error shapes, no Redis binary.
The embedded AWS must be the loopback server (``embedded.ServerAWS``): workers are other
processes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachevault_tools.local.lambda_sandbox import ExecutionEnvironment, InitError, Outcome, WorkerSetup
from cachevault_tools.local.lambda_worker import REDIS_BINARIES
from cachevault_tools.local.lambda_zygote import Zygote, ZygoteUnavailable

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class LambdaSemantics:
    """Which of Lambda's restrictions the runtime enforces; all of them by default."""

    freeze: bool = True  # SIGSTOP the environment (worker + what it started) when the handler returns
    read_only_code: bool = True  # every file system read-only except /tmp (the code dir included)
    private_tmp: bool = True  # /tmp per environment, EphemeralStorage MB (ENOSPC beyond)
    timeout: bool = True  # kill at Timeout: Sandbox.Timedout
    memory: bool = True  # kill when the worker tree's RSS passes MemorySize: Runtime.OutOfMemory
    no_redis: bool = True  # no redis-server/valkey-server/redis-cli reachable (PATH, exec refused)
    # Host variables an environment also gets, on top of the template's (a relaxation: a
    # Lambda gets nothing from the machine that deployed it).
    host_env: tuple[str, ...] = ()
    isolation: str = "auto"  # auto: mount namespace where possible, else audit hook | audit: hook only


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
    role: str = ""
    ephemeral_mb: int = 512


@dataclass(frozen=True)
class InvocationResult:
    payload: str  # JSON text Lambda would return
    errored: bool
    logs: str
    duration_s: float


@dataclass
class _Pool:
    """The environments of one function: idle ones (frozen) and every live one."""

    idle: list[ExecutionEnvironment] = field(default_factory=list)
    live: set[ExecutionEnvironment] = field(default_factory=set)


@dataclass
class LambdaRuntime:
    """Registry of handlers, their execution environments, and the invoke path moto is patched to call."""

    # What every environment gets from the emulator itself: the embedded AWS endpoint, and
    # POWERTOOLS_TRACE_DISABLED (no X-Ray daemon here).
    base_env: dict[str, str] = field(default_factory=dict)
    # role ARN -> AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN of that role
    # (cachevault_tools.local.iam.role_credentials: STS AssumeRole by the embedded AWS's admin).
    role_credentials: Callable[[str], Mapping[str, str]] | None = None
    semantics: LambdaSemantics = field(default_factory=LambdaSemantics)
    init_timeout_s: float = 60.0  # a cold start on a loaded machine imports boto3 and Powertools
    # New environments fork from a per-runtime zygote that has imported the third-party
    # modules (lambda_zygote); off (CACHEVAULT_LAMBDA_ZYGOTE=0): a fresh interpreter each.
    use_zygote: bool = field(default_factory=lambda: os.environ.get("CACHEVAULT_LAMBDA_ZYGOTE", "1") != "0")
    _specs: dict[str, HandlerSpec] = field(default_factory=dict)
    _function_semantics: dict[str, LambdaSemantics] = field(default_factory=dict)
    _pools: dict[str, _Pool] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _scratch: Path | None = None
    _zygotes: dict[str, Zygote] = field(default_factory=dict)
    _zygote_lock: threading.Lock = field(default_factory=threading.Lock)
    invocations: dict[str, int] = field(default_factory=dict)
    isolation_seen: set[str] = field(default_factory=set)

    def register(self, spec: HandlerSpec) -> None:
        with self._lock:
            self._specs[spec.function_name] = spec
        self._retire(spec.function_name, keep=None)  # re-deploy = cold start

    def unregister(self, function_name: str) -> None:
        with self._lock:
            self._specs.pop(function_name, None)
        self._retire(function_name, keep=None)

    def registered(self) -> dict[str, HandlerSpec]:
        return dict(self._specs)

    def set_semantics(self, function_name: str, semantics: LambdaSemantics) -> None:
        """Restrictions for one function (others keep :attr:`semantics`); its warm environments end."""
        with self._lock:
            self._function_semantics[function_name] = semantics
        self._retire(function_name, keep=None)

    def semantics_for(self, function_name: str) -> LambdaSemantics:
        return self._function_semantics.get(function_name, self.semantics)

    def environments(self, function_name: str) -> list[ExecutionEnvironment]:
        """The live environments of a function (for tests and diagnostics)."""
        with self._lock:
            pool = self._pools.get(function_name)
            return list(pool.live) if pool else []

    def invoke(self, config: FunctionConfig, event: Any) -> InvocationResult:
        request_id = str(uuid.uuid4())
        started = time.monotonic()
        with self._lock:
            self.invocations[config.function_name] = self.invocations.get(config.function_name, 0) + 1
            spec = self._specs.get(config.function_name)
        if spec is None:
            return _error_result(
                "Runtime.HandlerNotFound",
                f"no local handler registered for {config.function_name} (deploy it with the local deployer)",
                [],
                request_id,
                started,
            )
        semantics = self.semantics_for(config.function_name)
        setup = self._setup(config, spec, semantics)
        try:
            env = self._checkout(config, setup)
        except InitError as exc:
            payload = exc.payload
            return _error_result(
                payload.get("errorType", "Runtime.Unknown"),
                payload.get("errorMessage", ""),
                payload.get("stackTrace", []),
                request_id,
                started,
            )
        request = {"request_id": request_id, "event": event, "arn": config.arn, "remaining_ms": config.timeout * 1000}
        init_s = env.init_duration_s if env.invocations == 0 else None  # reported on the cold invocation
        outcome = env.invoke(
            request,
            timeout_s=config.timeout if semantics.timeout else None,
            memory_mb=config.memory_mb if semantics.memory else None,
        )
        self._checkin(config.function_name, env, semantics, healthy=outcome.kind in ("result", "error"))
        return _result(outcome, config, request_id, started, init_s)

    def shutdown(self) -> None:
        """End every environment (and what it started)."""
        with self._lock:
            envs = [env for pool in self._pools.values() for env in pool.live]
            self._pools.clear()
            scratch, self._scratch = self._scratch, None
        for env in envs:
            env.kill()
        with self._zygote_lock:
            zygotes, self._zygotes = list(self._zygotes.values()), {}
        for zygote in zygotes:
            zygote.stop()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    # --- environments -------------------------------------------------------------------

    def _checkout(self, config: FunctionConfig, setup: WorkerSetup) -> ExecutionEnvironment:
        with self._lock:
            pool = self._pools.setdefault(config.function_name, _Pool())
            for env in pool.idle:
                if env.setup == setup and env.alive:
                    pool.idle.remove(env)
                    return env
            env = ExecutionEnvironment(setup, self._scratch_root())
            pool.live.add(env)
        self._retire(config.function_name, keep=setup)
        try:
            extra_env = self._role_credentials(config)
            env.start(self.init_timeout_s, extra_env=extra_env, zygote=self._zygote(config.runtime))
        except BaseException:
            with self._lock:
                pool.live.discard(env)
            env.kill()
            raise
        self.isolation_seen.add(env.isolation)
        return env

    def _zygote(self, runtime: str) -> Zygote | None:
        """The runtime's zygote, started on first use (None: off, or it could not start)."""
        if not self.use_zygote:
            return None
        with self._zygote_lock:
            zygote = self._zygotes.get(runtime)
            if zygote is not None and zygote.alive:
                return zygote
            zygote = Zygote(runtime)
            try:
                zygote.start(self.init_timeout_s)
            except ZygoteUnavailable as exc:
                LOG.warning("Lambda environments start as fresh processes: %s", exc)
                self.use_zygote = False
                return None
            self._zygotes[runtime] = zygote
            return zygote

    def _checkin(
        self, function_name: str, env: ExecutionEnvironment, semantics: LambdaSemantics, healthy: bool
    ) -> None:
        if healthy and env.alive:
            if semantics.freeze:
                env.freeze()
            with self._lock:
                pool = self._pools.get(function_name)
                if pool is not None and env in pool.live:
                    pool.idle.append(env)
                    return
        with self._lock:
            pool = self._pools.get(function_name)
            if pool is not None:
                pool.live.discard(env)
        env.kill()

    def _retire(self, function_name: str, keep: WorkerSetup | None) -> None:
        """End idle environments whose setup is stale (configuration changed, re-deploy)."""
        with self._lock:
            pool = self._pools.get(function_name)
            if pool is None:
                return
            stale = [env for env in pool.idle if env.setup != keep]
            for env in stale:
                pool.idle.remove(env)
                pool.live.discard(env)
            if keep is None:
                pool.live.clear()  # busy ones end after their invocation (not in live: killed at checkin)
        for env in stale:
            env.kill()

    def _scratch_root(self) -> Path:
        with self._lock:
            if self._scratch is None:
                self._scratch = Path(tempfile.mkdtemp(prefix="cachevault-lambda-"))
            return self._scratch

    def _setup(self, config: FunctionConfig, spec: HandlerSpec, semantics: LambdaSemantics) -> WorkerSetup:
        env: dict[str, str] = {
            "PATH": self._lambda_path() if semantics.no_redis else os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "TZ": ":UTC",
            "AWS_REGION": config.region,
            "AWS_DEFAULT_REGION": config.region,
            "AWS_EXECUTION_ENV": f"AWS_Lambda_{config.runtime}",
            "AWS_LAMBDA_FUNCTION_NAME": config.function_name,
            "AWS_LAMBDA_FUNCTION_VERSION": config.version,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(config.memory_mb),
            "AWS_LAMBDA_FUNCTION_TIMEOUT": str(config.timeout),
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{config.function_name}",
            "LAMBDA_TASK_ROOT": str(spec.code_dir),
            "LAMBDA_RUNTIME_DIR": str(Path(__file__).parent),
            "_HANDLER": spec.handler,
        }
        env.update(self.base_env)
        env.update({name: os.environ[name] for name in semantics.host_env if name in os.environ})
        env.update({k: str(v) for k, v in config.env.items()})
        return WorkerSetup(
            function_name=config.function_name,
            code_dir=spec.code_dir,
            handler=spec.handler,
            layer_dirs=spec.layer_dirs,
            env=tuple(sorted(env.items())),
            tmp_mb=config.ephemeral_mb if semantics.private_tmp else None,
            read_only=semantics.read_only_code,
            no_redis=semantics.no_redis,
            isolation=semantics.isolation,
        )

    def _role_credentials(self, config: FunctionConfig) -> dict[str, str]:
        """Per environment: credentials from STS AssumeRole of the function's role, as Lambda does."""
        extra = {"AWS_LAMBDA_LOG_STREAM_NAME": time.strftime("%Y/%m/%d/[$LATEST]") + uuid.uuid4().hex}
        if not config.role or self.role_credentials is None:
            raise InitError(
                {
                    "errorType": "Runtime.InvalidEnvironment",
                    "errorMessage": "the local Lambda runtime needs a role and the embedded AWS to assume it",
                }
            )
        try:
            creds = self.role_credentials(config.role)
        except Exception as exc:  # Lambda reports a role it cannot assume as an init error
            raise InitError({"errorType": "Runtime.AssumeRoleFailed", "errorMessage": f"{config.role}: {exc}"}) from exc
        # Lambda's credentials come last: the template cannot override them.
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            extra[name] = creds[name]
        return extra

    def _lambda_path(self) -> str:
        """PATH with no Redis binary on it: directories holding one are replaced by a copy without."""
        host_path = os.environ.get("PATH", "/usr/bin:/bin")
        # Not under /tmp: a private /tmp hides the host's. Symlinks only, keyed by PATH.
        root = Path.home() / ".cache" / "cachevault" / "lambda-path" / hashlib.sha1(host_path.encode()).hexdigest()[:12]
        with self._lock:
            if (root / ".done").exists():
                return (root / ".done").read_text()
            entries = [str(Path(sys.executable).parent)]
            for index, directory in enumerate(host_path.split(os.pathsep)):
                path = Path(directory)
                if not path.is_dir() or directory in entries:
                    continue
                if not any((path / name).exists() for name in REDIS_BINARIES):
                    entries.append(directory)
                    continue
                shim = root / str(index)
                shim.mkdir(parents=True, exist_ok=True)
                for item in path.iterdir():
                    target = os.path.basename(os.path.realpath(item))
                    if item.name not in REDIS_BINARIES and target not in REDIS_BINARIES:
                        with contextlib.suppress(FileExistsError):
                            (shim / item.name).symlink_to(item)
                entries.append(str(shim))
            value = os.pathsep.join(entries)
            (root / ".done").write_text(value)
            return value


def _result(
    outcome: Outcome, config: FunctionConfig, request_id: str, started: float, init_s: float | None = None
) -> InvocationResult:
    if outcome.kind == "result":
        elapsed = time.monotonic() - started
        # Lambda's Duration is the handler's; the cold start is the Init Duration.
        report = _report(request_id, elapsed - (init_s or 0.0), config, init_s)
        return InvocationResult(str(outcome.body), False, report, elapsed)
    if outcome.kind == "error":
        err = outcome.body
        return _error_result(err["errorType"], err["errorMessage"], err.get("stackTrace", []), request_id, started)
    if outcome.kind == "timeout":
        message = f"RequestId: {request_id} Error: Task timed out after {config.timeout:.2f} seconds"
        return _error_result("Sandbox.Timedout", message, [], request_id, started)
    if outcome.kind == "oom":
        message = f"RequestId: {request_id} Error: Runtime exited with error: signal: killed"
        return _error_result("Runtime.OutOfMemory", message, [], request_id, started)
    message = f"RequestId: {request_id} Error: Runtime exited with error: {outcome.detail}"
    return _error_result("Runtime.ExitError", message, [], request_id, started)


def _error_result(error_type: str, message: str, stack: list[str], request_id: str, started: float) -> InvocationResult:
    elapsed = time.monotonic() - started
    payload = json.dumps(
        {"errorMessage": message, "errorType": error_type, "requestId": request_id, "stackTrace": stack}
    )
    logs = f"START RequestId: {request_id}\n[ERROR] {error_type}: {message}\nEND RequestId: {request_id}"
    return InvocationResult(payload, True, logs, elapsed)


def _report(request_id: str, elapsed: float, config: FunctionConfig, init_s: float | None = None) -> str:
    init = "" if init_s is None else f"\tInit Duration: {init_s * 1000:.2f} ms"  # the cold start, as Lambda reports it
    return (
        f"START RequestId: {request_id} Version: {config.version}\n"
        f"END RequestId: {request_id}\n"
        f"REPORT RequestId: {request_id}\tDuration: {elapsed * 1000:.2f} ms\t"
        f"Memory Size: {config.memory_mb} MB{init}"
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
                role=str(self.role or ""),
                ephemeral_mb=int(self.ephemeral_storage or 512),
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
        _patch_map_iteration_abort()


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


def _patch_map_iteration_abort() -> None:
    """Fix moto 5.2.1: StopExecution while a Map iterates ends the execution FAILED, not ABORTED.

    The stopped iterations fail the Map state (MapIterationAborted, then MapStateFailed), and
    that failure reaches the program, whose ``set_error`` replaces the stopped state: the
    execution ends FAILED with no error. On AWS a stopped execution is ABORTED, whatever its
    states do afterwards (ops/recovery.py reads that status), so an error never replaces a stop.
    """
    from moto.stepfunctions.parser.asl.eval.environment import Environment
    from moto.stepfunctions.parser.asl.eval.program_state import ProgramStopped

    if getattr(Environment, "_cachevault_abort_fix", False):
        return
    real = Environment.set_error

    def set_error(self: Any, error: Any) -> None:
        with self._state_mutex:  # an RLock: the real set_error takes it again
            if not isinstance(self._program_state, ProgramStopped):
                real(self, error)

    Environment.set_error = set_error
    Environment._cachevault_abort_fix = True


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
