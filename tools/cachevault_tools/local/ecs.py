"""The embedded ECS: RunTask starts a task's containers as local processes.

moto 5.2.1's ECS keeps task records and runs nothing. This module wraps its backend's
``run_task``/``describe_tasks``/``stop_task`` (private, so moto stays pinned) so that:

* RunTask starts every container of the task as a process: an image is mapped to a local
  program (:func:`container_argv`): ``redis:<ver>`` runs redis-server, ``valkey/valkey:<ver>``
  valkey-server, the cachevault worker image runs its command with this venv's python;
* each task gets its own loopback address (127.0.0.0/8 is all loopback on Linux) whose
  :6379 and cluster bus :16379 are free (bind-tested: other suites run at the same time),
  reported as Fargate reports it: ``attachments`` ENI ``privateIPv4Address`` and
  ``containers[].networkInterfaces``;
* DescribeTasks reports ``lastStatus`` PROVISIONING (RunTask's answer) / RUNNING / STOPPED,
  ``stopCode``, ``stoppedReason`` and ``containers[].exitCode`` from the processes;
* StopTask sends SIGTERM, then SIGKILL after the stop timeout; each process is waited on by
  a reaper thread (no zombies).

The processes belong to the process running moto (the test process or ``local up``), never
to a Lambda invocation, so they outlive the step that asked for them, as tasks do. Workers
reach the embedded AWS through ``RUNNER.base_env`` (the server endpoint) with their task
role's credentials (``RUNNER.role_credentials``: STS AssumeRole of the definition's
``taskRoleArn``, cachevault_tools/local/iam.py), as a task's containers get them.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachevault.nodes.restore_targets import TLS_CA_FILE, TLS_CA_PEM_ENV

LOG = logging.getLogger(__name__)

NODE_PORT = 6379
CLUSTER_BUS_PORT = 16379
STOP_TIMEOUT_S = 10.0
_ADDRESS_DRAWS = 200
_PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")


class ContainerImageError(RuntimeError):
    """An image the embedded ECS cannot map to a local program."""


def _server_binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/local/bin:/usr/sbin")
    if not found:
        raise ContainerImageError(f"{name} is not installed: the image needs it locally (make redis)")
    return found


def container_argv(image: str, command: list[str] | None, entry_point: list[str] | None) -> list[str]:
    """The local program and arguments a container of ``image`` runs."""
    repo = image.rsplit("@", 1)[0]
    name = repo.rsplit(":", 1)[0] if ":" in repo.rsplit("/", 1)[-1] else repo
    base = name.rsplit("/", 1)[-1]
    args = [*(entry_point or []), *(command or [])]
    if base in ("redis", "valkey"):
        server = "valkey-server" if base == "valkey" else "redis-server"
        # The official images' entrypoint: no command or leading flags mean the server.
        if not args or args[0].startswith("-"):
            return [_server_binary(server), *args]
        if args[0] in ("redis-server", "valkey-server"):
            return [_server_binary(args[0]), *args[1:]]
        raise ContainerImageError(f"{image}: command {args[0]!r} is not a server this embedded ECS runs")
    if "cachevault" in base:
        if not args:
            raise ContainerImageError(f"{image}: the worker image needs a command")
        if args[0] in ("python", "python3") or args[0].startswith("python3."):
            return [sys.executable, *args[1:]]
        return args
    raise ContainerImageError(f"image {image!r} has no local equivalent (redis, valkey/valkey, cachevault worker)")


def _bindable(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


@dataclass
class LocalContainer:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    reason: str = ""


@dataclass
class LocalTask:
    arn: str
    address: str
    workdir: Path
    containers: list[LocalContainer] = field(default_factory=list)
    stop_requested: bool = False
    stop_reason: str = ""
    stopped_at: datetime.datetime | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def running(self) -> bool:
        return any(c.process is not None and c.exit_code is None for c in self.containers)


class TaskRunner:
    """The processes of the tasks RunTask started, by task ARN."""

    def __init__(self) -> None:
        self.tasks: dict[str, LocalTask] = {}
        self.base_env: dict[str, str] = {}
        # role ARN -> its STS credentials as env variables (the embedded AWS sets it): a task's
        # processes run with its task role's credentials, as ECS gives them to containers.
        self.role_credentials: Callable[[str], Mapping[str, str]] | None = None
        self._lock = threading.Lock()
        # Task working dirs (logs; a node's dump would go there): made on the first RunTask.
        self.root = Path(tempfile.gettempdir()) / f"cachevault-ecs-{os.getpid()}"

    # -- addresses --
    def _pick_address(self) -> str:
        with self._lock:
            taken = {t.address for t in self.tasks.values() if t.running}
        for _ in range(_ADDRESS_DRAWS):
            address = f"127.{random.randint(16, 250)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
            if address not in taken and _bindable(address, NODE_PORT) and _bindable(address, CLUSTER_BUS_PORT):
                return address
        raise OSError("no free loopback address with :6379 and :16379 free")

    # -- lifecycle --
    def start(
        self, arn: str, definitions: list[dict[str, Any]], overrides: dict[str, Any], task_role_arn: str = ""
    ) -> LocalTask:
        # Assumed first: a role that cannot be assumed fails RunTask, with no process started.
        role_env = dict(self.role_credentials(task_role_arn)) if task_role_arn and self.role_credentials else {}
        address = self._pick_address()
        workdir = self.root / arn.rsplit("/", 1)[-1]
        workdir.mkdir(parents=True, mode=0o700)
        task = LocalTask(arn=arn, address=address, workdir=workdir)
        by_name = {o.get("name"): o for o in (overrides or {}).get("containerOverrides") or []}
        with self._lock:
            self.tasks[arn] = task
        for definition in definitions:
            override = by_name.get(definition.get("name"), {})
            container = LocalContainer(name=str(definition.get("name")), argv=[])
            task.containers.append(container)
            try:
                container.argv = container_argv(
                    str(definition.get("image")),
                    override.get("command") or definition.get("command"),
                    definition.get("entryPoint"),
                )
                env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
                env.update(self.base_env)
                for pair in [*(definition.get("environment") or []), *(override.get("environment") or [])]:
                    env[str(pair["name"])] = str(pair["value"])
                env.update(role_env)  # after the definition's: a task cannot set its own credentials
                env["ECS_TASK_ARN"] = arn
                env["ECS_TASK_PRIVATE_IP"] = address
                argv = list(container.argv)
                if Path(argv[0]).name in ("redis-server", "valkey-server") and "--bind" not in argv:
                    argv += ["--bind", address]  # the task's own address, as an ENI gives
                if env.get(TLS_CA_PEM_ENV):
                    # What a node image's entry does with the CA it is given as text.
                    (workdir / TLS_CA_FILE).write_text(env[TLS_CA_PEM_ENV])
                log = (workdir / f"{container.name}.log").open("ab")
                container.process = subprocess.Popen(
                    argv, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
                log.close()
            except (OSError, ContainerImageError) as exc:
                container.exit_code, container.reason = 1, f"CannotStartContainerError: {exc}"
                continue
            threading.Thread(target=self._reap, args=(task, container), daemon=True, name=f"ecs-reap-{arn}").start()
        if not task.running:
            self._finish(task)
        return task

    def _reap(self, task: LocalTask, container: LocalContainer) -> None:
        assert container.process is not None
        container.exit_code = container.process.wait()
        if not task.running:
            self._finish(task)
        elif not task.stop_requested:
            # An essential container exited: ECS stops the task's other containers.
            task.stop_reason = task.stop_reason or "Essential container in task exited"
            threading.Thread(target=self.stop, args=(task.arn, task.stop_reason, False), daemon=True).start()

    def _finish(self, task: LocalTask) -> None:
        if task.stopped_at is None:
            task.stopped_at = datetime.datetime.now(datetime.UTC)
        task.done.set()

    def stop(self, arn: str, reason: str = "", user: bool = True, timeout: float = STOP_TIMEOUT_S) -> None:
        task = self.tasks.get(arn)
        if task is None:
            return
        if user:
            task.stop_requested = True
            task.stop_reason = reason or "Task stopped by user"
        procs = [c.process for c in task.containers if c.process is not None and c.exit_code is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
                os.killpg(proc.pid, signal.SIGCONT)  # a stopped (hung) process must see the TERM too
        for proc in procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        task.done.wait(timeout=timeout)

    def kill(self, arn: str) -> None:
        """SIGKILL the task's processes, as a crash or a lost host would (the task then stops)."""
        for container in self.tasks[arn].containers:
            if container.process is not None and container.exit_code is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(container.process.pid, signal.SIGKILL)
        self.tasks[arn].done.wait(timeout=STOP_TIMEOUT_S)

    def pids(self, arn: str) -> list[int]:
        """PIDs of the task's live processes."""
        task = self.tasks.get(arn)
        if task is None:
            return []
        return [c.process.pid for c in task.containers if c.process is not None and c.exit_code is None]

    def stop_all(self) -> None:
        for arn in list(self.tasks):
            self.stop(arn, "embedded ECS shut down")
        shutil.rmtree(self.root, ignore_errors=True)
        self.tasks.clear()

    # -- what DescribeTasks reports --
    def apply(self, task: Any) -> None:
        local = self.tasks.get(task.task_arn)
        if local is None:
            return
        stopped = local.done.is_set()
        task._local_status = "STOPPED" if stopped else "RUNNING"
        task.desired_status = "STOPPED" if stopped or local.stop_requested else "RUNNING"
        if stopped:
            task.stop_code = "UserInitiated" if local.stop_requested else "EssentialContainerExited"
            task.stopped_reason = local.stop_reason or "Essential container in task exited"
            task.stopped_at = local.stopped_at
        _report_network(task, local)
        for model, container in zip(task.containers, local.containers, strict=False):
            model.last_status = "STOPPED" if container.exit_code is not None else "RUNNING"
            if container.exit_code is not None:
                model.exit_code = model.exitCode = container.exit_code
                if container.reason:
                    model.reason = container.reason


def _report_network(task: Any, local: LocalTask) -> None:
    eni = {"attachmentId": "local", "privateIpv4Address": local.address}
    for model in task.containers:
        model.network_interfaces = [eni]
    for attachment in task.attachments:
        for detail in attachment.get("details", []):
            if detail.get("name") == "privateIPv4Address":
                detail["value"] = local.address
    if not task.attachments:
        task.attachments.append(
            {
                "id": "local",
                "type": "ElasticNetworkInterface",
                "status": "ATTACHED",
                "details": [{"name": "privateIPv4Address", "value": local.address}],
            }
        )


RUNNER = TaskRunner()
_installed = False


def install(runner: TaskRunner = RUNNER) -> None:
    """Wrap moto's ECS backend so tasks run (idempotent)."""
    global _installed
    if _installed:
        return
    from moto.ecs import models

    backend_cls = models.EC2ContainerServiceBackend
    real_run, real_describe, real_stop = backend_cls.run_task, backend_cls.describe_tasks, backend_cls.stop_task
    status_property = models.Task.last_status

    def last_status(self: Any) -> str:
        return getattr(self, "_local_status", None) or status_property.fget(self)

    def set_last_status(self: Any, value: str) -> None:
        status_property.fset(self, value)

    def run_task(self: Any, cluster_str: str, task_definition_str: str, count: int, overrides: Any, *args: Any,
                 **kwargs: Any) -> Any:  # fmt: skip
        definition = self.describe_task_definition(task_definition_str)
        args_list = list(args)
        # Every task runs on loopback here: a subnet the embedded EC2 does not know is
        # replaced by its default one (moto makes an ENI in it).
        net_index = 3  # (started_by, tags, launch_type, networking_configuration, ...)
        net = kwargs.get("networking_configuration") if "networking_configuration" in kwargs else (
            args_list[net_index] if len(args_list) > net_index else None
        )
        if definition.network_mode == "awsvpc":
            net = _known_subnet(self, net)
            if "networking_configuration" in kwargs or len(args_list) <= net_index:
                kwargs["networking_configuration"] = net
            else:
                args_list[net_index] = net
        tasks = real_run(self, cluster_str, task_definition_str, count, overrides, *args_list, **kwargs)
        for task in tasks:
            task_role = (overrides or {}).get("taskRoleArn") or getattr(definition, "task_role_arn", None) or ""
            runner.start(task.task_arn, definition.container_definitions, overrides or {}, str(task_role))
            runner.apply(task)
            if not runner.tasks[task.task_arn].done.is_set():
                task._local_status = "PROVISIONING"  # what RunTask answers on Fargate
        return tasks

    def describe_tasks(self: Any, cluster_str: str, tasks: list[str]) -> Any:
        found = real_describe(self, cluster_str, tasks)
        for task in found:
            runner.apply(task)
        return found

    def stop_task(self: Any, cluster_str: str, task_str: str, reason: str) -> Any:
        task = real_stop(self, cluster_str, task_str, reason)
        runner.stop(task.task_arn, reason)
        runner.apply(task)
        return task

    _patch_step_functions_ecs_integration()
    models.Task.last_status = property(last_status, set_last_status)  # type: ignore[assignment]
    backend_cls.run_task = run_task  # type: ignore[method-assign]
    backend_cls.describe_tasks = describe_tasks  # type: ignore[method-assign]
    backend_cls.stop_task = stop_task  # type: ignore[method-assign]
    _installed = True


def _patch_step_functions_ecs_integration() -> None:
    """moto 5.2.1's Step Functions ECS integration (``state_task_service_ecs.py``) calls the
    request/response normalisation its base class leaves empty, so ``Cluster`` reached boto3
    unconverted and ``Tasks`` was never in the answer. Fill both in from botocore's ECS model,
    with the converters that base class already has (``_to_boto_request``/``_from_boto_response``)."""
    from botocore import xform_name
    from botocore.session import get_session
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_ecs import (
        StateTaskServiceEcs,
    )

    model = get_session().get_service_model("ecs")
    operations = {xform_name(name): name for name in model.operation_names}

    def operation(self: Any, action: str | None) -> Any:
        return model.operation_model(operations[self._get_boto_service_action(action)])

    def normalise_parameters(self: Any, parameters: dict[str, Any], boto_service_name: str | None = None,
                             service_action_name: str | None = None) -> None:  # fmt: skip
        self._to_boto_request(parameters, operation(self, service_action_name).input_shape)

    def normalise_response(self: Any, response: Any, boto_service_name: str | None = None,
                           service_action_name: str | None = None) -> None:  # fmt: skip
        self._from_boto_response(response, operation(self, service_action_name).output_shape)
        _epoch_millis(response)  # Step Functions hands ECS timestamps on as epoch milliseconds

    StateTaskServiceEcs._normalise_parameters = normalise_parameters  # type: ignore[method-assign]
    StateTaskServiceEcs._normalise_response = normalise_response  # type: ignore[method-assign]


def _epoch_millis(value: Any) -> Any:
    if isinstance(value, dict):
        for key, item in value.items():
            value[key] = _epoch_millis(item)
    elif isinstance(value, list):
        value[:] = [_epoch_millis(item) for item in value]
    elif isinstance(value, datetime.datetime):
        return int(value.timestamp() * 1000)
    return value


def _known_subnet(backend: Any, net: dict[str, Any] | None) -> dict[str, Any]:
    from moto.ec2.models import ec2_backends

    ec2 = ec2_backends[backend.account_id][backend.region_name]
    conf = dict((net or {}).get("awsvpcConfiguration") or {})
    known = {s.id for s in ec2.describe_subnets()}
    subnets = [s for s in conf.get("subnets") or [] if s in known]
    if not subnets:
        vpc = ec2.get_default_vpc() or ec2.create_default_vpc()
        subnets = [next(s.id for s in ec2.describe_subnets() if s.vpc_id == vpc.id)]
    conf["subnets"] = subnets
    groups = {g.id for g in ec2.describe_security_groups()}
    conf["securityGroups"] = [g for g in conf.get("securityGroups") or [] if g in groups]
    return {**(net or {}), "awsvpcConfiguration": conf}
