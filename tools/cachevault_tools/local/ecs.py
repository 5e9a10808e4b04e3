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
  a reaper thread (no zombies). A stopped task's working dir goes with it.
* a container definition's ``essential`` (a non-essential one may exit, the task runs on) and
  ``dependsOn`` (START, COMPLETE, SUCCESS: the container starts once its dependencies meet the
  condition; a condition that can no longer be met stops the task, as ECS does), the task
  PENDING until every essential container runs;
* task ``volumes`` are directories under the task's working dir; a container's
  ``mountPoints`` map its ``containerPath`` there: in its argv and environment (what a bind
  mount makes of a path) and as its working dir when the image works in a mounted path
  (the redis and valkey images work in ``/data``).

Tasks outlive the embedded AWS, recorded in :mod:`cachevault_tools.local.ecs_registry`
(``$CACHEVAULT_HOME/ecs/``): when it stops (:meth:`TaskRunner.stop_all`) worker tasks stop
for good but node tasks are suspended: each server was started with ``shutdown-on-sigint
save``, so SIGINT saves its dataset to dump.rdb in the task's working dir whatever its AUTH
and TLS (measured: the same ~0.5 s for 300k keys as SHUTDOWN SAVE over its port), while
StopTask's SIGTERM still does not. What it was told at run time (REPLICAOF, announce
addresses) is read first and given back as arguments. The next start, once the template is
deployed (:meth:`TaskRunner.resume`), puts them back in moto's ECS with the same ARN and
starts them at the same address, loading dump.rdb (and a cluster node its nodes.conf).
After a SIGKILL of the embedded AWS, node processes still running are adopted (checked by
start time and program, watched through a pidfd) and worker processes are killed.

The processes belong to the process running moto (the test process or ``local up``), never
to a Lambda invocation, so they outlive the step that asked for them, as tasks do. Workers
reach the embedded AWS through ``RUNNER.base_env`` (the server endpoint) with their task
role's credentials (``RUNNER.role_credentials``: STS AssumeRole of the definition's
``taskRoleArn``, cachevault_tools/local/iam.py), as a task's containers get them.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import random
import re
import select
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

import redis
from cachevault.nodes.restore_targets import TLS_CA_FILE, TLS_CA_PEM_ENV

from cachevault_tools.local import ecs_registry
from cachevault_tools.local.ecs_registry import (
    NODE,
    RUNNING,
    SUSPENDED,
    WORKER,
    ContainerRecord,
    TaskRecord,
    TaskRegistry,
    is_server,
)

LOG = logging.getLogger(__name__)

NODE_PORT = 6379
CLUSTER_BUS_PORT = 16379
STOP_TIMEOUT_S = 10.0
# A node's save before the embedded AWS stops: its whole dataset to disk (~1 GB: seconds).
SUSPEND_TIMEOUT_S = 120.0
_ADDRESS_DRAWS = 200
_PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
SERVER_IMAGE_WORKDIR = "/data"  # WORKDIR of the official redis and valkey images
_CONDITIONS = ("START", "COMPLETE", "SUCCESS")  # HEALTHY needs health checks, which no definition here has


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
    env: dict[str, str] = field(default_factory=dict)
    essential: bool = True
    depends_on: list[tuple[str, str]] = field(default_factory=list)  # (container name, condition)
    cwd: Path | None = None  # None: the task's working dir
    pending: bool = False  # waiting for its dependencies
    process: subprocess.Popen[bytes] | None = None  # None for a process adopted from a previous run
    pid: int | None = None
    start_time: int | None = None
    exit_code: int | None = None  # unknown for an adopted process (only a parent learns it)
    reason: str = ""
    gone: threading.Event = field(default_factory=threading.Event)

    @property
    def alive(self) -> bool:
        return self.pid is not None and not self.gone.is_set()


@dataclass
class LocalTask:
    arn: str
    address: str
    workdir: Path
    log_dir: Path
    record: TaskRecord
    containers: list[LocalContainer] = field(default_factory=list)
    stop_requested: bool = False
    # The embedded AWS is stopping: the processes exit, the task (record, storage) stays.
    suspending: bool = False
    stop_reason: str = ""
    stopped_at: datetime.datetime | None = None
    done: threading.Event = field(default_factory=threading.Event)
    changed: threading.Event = field(default_factory=threading.Event)  # a container started or exited
    stopping: bool = False

    @property
    def running(self) -> bool:
        return any(c.alive or c.pending for c in self.containers)

    def container(self, name: str) -> LocalContainer | None:
        return next((c for c in self.containers if c.name == name), None)


class TaskRunner:
    """The processes of the tasks RunTask started, by task ARN, recorded in a :class:`TaskRegistry`."""

    def __init__(self) -> None:
        self.tasks: dict[str, LocalTask] = {}
        self.base_env: dict[str, str] = {}
        # role ARN -> its STS credentials as env variables (the embedded AWS sets it): a task's
        # processes run with its task role's credentials, as ECS gives them to containers.
        self.role_credentials: Callable[[str], Mapping[str, str]] | None = None
        self._lock = threading.RLock()
        # Until the embedded AWS opens $CACHEVAULT_HOME/ecs (ServerAWS.start): a private dir.
        self.registry = TaskRegistry(Path(tempfile.gettempdir()) / f"cachevault-ecs-{os.getpid()}")

    def open(self, root: Path) -> TaskRunner:
        """Keep task records, working dirs and logs under ``root`` (``$CACHEVAULT_HOME/ecs``)."""
        self.registry = TaskRegistry(root)
        return self

    # -- addresses --
    def _pick_address(self) -> str:
        with self._lock:
            taken = {t.address for t in self.tasks.values() if t.running}
        taken |= {r.address for r in self.registry.load_all()}  # suspended tasks come back to theirs
        for _ in range(_ADDRESS_DRAWS):
            address = f"127.{random.randint(16, 250)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
            if address not in taken and _bindable(address, NODE_PORT) and _bindable(address, CLUSTER_BUS_PORT):
                return address
        raise OSError("no free loopback address with :6379 and :16379 free")

    # -- lifecycle --
    def start(
        self,
        record: TaskRecord,
        definitions: list[dict[str, Any]],
        task_role_arn: str = "",
        volumes: list[dict[str, Any]] | None = None,
    ) -> LocalTask:
        """Start the containers of the task RunTask made (``record``: what it was given)."""
        # Assumed first: a role that cannot be assumed fails RunTask, with no process started.
        role_env = dict(self.role_credentials(task_role_arn)) if task_role_arn and self.role_credentials else {}
        address = self._pick_address()
        workdir, log_dir = self.registry.make_dirs(record.task_id)
        record.address, record.workdir = address, str(workdir)
        task = LocalTask(arn=record.arn, address=address, workdir=workdir, log_dir=log_dir, record=record)
        by_name = {o.get("name"): o for o in (record.overrides or {}).get("containerOverrides") or []}
        with self._lock:
            self.tasks[record.arn] = task
        volume_dirs = _volume_dirs(workdir, volumes or [])
        for definition in definitions:
            override = by_name.get(definition.get("name"), {})
            container = LocalContainer(
                name=str(definition.get("name")),
                argv=[],
                essential=definition.get("essential", True) is not False,
                depends_on=[(str(d.get("containerName")), str(d.get("condition"))) for d in
                            definition.get("dependsOn") or []],
            )  # fmt: skip
            task.containers.append(container)
            try:
                mounts = _mounts(definition, volume_dirs)
                argv = container_argv(
                    str(definition.get("image")),
                    override.get("command") or definition.get("command"),
                    definition.get("entryPoint"),
                )
                _check_dependencies(container, definitions)
            except ContainerImageError as exc:
                container.exit_code, container.reason = 1, f"CannotStartContainerError: {exc}"
                container.gone.set()
                continue
            env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
            env.update(self.base_env)
            for pair in [*(definition.get("environment") or []), *(override.get("environment") or [])]:
                env[str(pair["name"])] = str(pair["value"])
            env.update(role_env)  # after the definition's: a task cannot set its own credentials
            env["ECS_TASK_ARN"] = record.arn
            env["ECS_TASK_PRIVATE_IP"] = address
            argv = [_mapped(a, mounts) for a in argv]
            env = {k: _mapped(v, mounts) for k, v in env.items()}
            if is_server(argv):
                container.cwd = _mapped_dir(SERVER_IMAGE_WORKDIR, mounts)
                if "--bind" not in argv:
                    argv += ["--bind", address]  # the task's own address, as an ENI gives
                if _saves_on_sigint(argv[0]):
                    # SIGINT (the embedded AWS stopping) saves the data; SIGTERM (StopTask) does not.
                    argv += ["--shutdown-on-sigint", "save"]
            container.argv, container.env = argv, env
        record.kind = NODE if any(is_server(c.argv) for c in task.containers) else WORKER
        # All pending first: a container that exits before the next one is spawned must not
        # find the task with nothing running and finish it.
        for container in task.containers:
            container.pending = not container.gone.is_set()
        for container in task.containers:
            if container.pending and not container.depends_on:
                self._spawn(task, container)
                container.pending = False
        if any(c.pending for c in task.containers):
            threading.Thread(target=self._start_dependents, args=(task,), daemon=True,
                             name=f"ecs-depends-{task.arn}").start()  # fmt: skip
        self._save(task)
        if not task.running:
            self._finish(task)
        return task

    def _start_dependents(self, task: LocalTask) -> None:
        """Start each waiting container once its dependencies meet their conditions; stop the
        task when one never can (a SUCCESS dependency that failed, a dependency that never ran)."""
        while any(c.pending for c in task.containers):  # bounded: every round starts or fails one, or waits
            progressed = False
            for container in [c for c in task.containers if c.pending]:
                verdict = _dependencies_met(task, container)
                if verdict is None:
                    continue
                progressed = True
                if task.stopping or task.suspending:
                    verdict = "the task is stopping"
                # Started (or given up) before it stops pending: a reaper asking whether the task
                # still runs must never see it neither pending nor started.
                if verdict is True:
                    self._spawn(task, container)
                    container.pending = False
                    self._save(task)
                    continue
                container.reason = f"DependencyConditionNotMet: {verdict}"
                container.gone.set()
                container.pending = False
                if container.essential:
                    task.stop_reason = task.stop_reason or (
                        f"Essential container {container.name} could not start: {verdict}"
                    )
                    self._stop_async(task)
            if not progressed:
                task.changed.wait(1.0)
                task.changed.clear()
        if not task.running:
            self._finish(task)

    def _stop_async(self, task: LocalTask) -> None:
        threading.Thread(target=self.stop, args=(task.arn, task.stop_reason, False), daemon=True).start()

    def _spawn(self, task: LocalTask, container: LocalContainer, extra: list[str] | None = None) -> None:
        try:
            cwd = container.cwd or task.workdir
            cwd.mkdir(parents=True, exist_ok=True)
            if container.env.get(TLS_CA_PEM_ENV):
                # What a node image's entry does with the CA it is given as text.
                (cwd / TLS_CA_FILE).write_text(container.env[TLS_CA_PEM_ENV])
            with (task.log_dir / f"{container.name}.log").open("ab") as log:
                process = subprocess.Popen(
                    [*container.argv, *(extra or [])], cwd=cwd, env=container.env, stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
        except OSError as exc:
            container.exit_code, container.reason = 1, f"CannotStartContainerError: {exc}"
            container.gone.set()
            return
        container.process, container.pid = process, process.pid
        container.start_time = ecs_registry.start_time(process.pid)
        task.changed.set()
        threading.Thread(target=self._reap, args=(task, container), daemon=True, name=f"ecs-reap-{task.arn}").start()

    def _adopt(self, task: LocalTask, container: LocalContainer, saved: ContainerRecord) -> bool:
        """Watch the process a previous run of the embedded AWS started, if it is still that process."""
        try:
            pidfd = os.pidfd_open(saved.pid) if saved.pid else None
        except OSError:
            pidfd = None
        if pidfd is None:
            return False
        # Checked with the pidfd open: the PID cannot name another process from here on.
        if not ecs_registry.same_process(saved.pid, saved.start_time, saved.argv):
            os.close(pidfd)
            return False
        container.pid, container.start_time = saved.pid, saved.start_time
        threading.Thread(
            target=self._reap, args=(task, container, pidfd), daemon=True, name=f"ecs-watch-{task.arn}"
        ).start()
        return True

    def _reap(self, task: LocalTask, container: LocalContainer, pidfd: int | None = None) -> None:
        if container.process is not None:
            container.exit_code = container.process.wait()
        elif pidfd is not None:
            # Not our child (adopted): its exit is seen through a pidfd, its status is its parent's.
            try:
                _wait_readable(pidfd, None)
            finally:
                os.close(pidfd)
        container.gone.set()
        task.changed.set()
        if not task.running:
            self._finish(task)
            return
        self._save(task)  # the registry names only live processes (a seed that served its node is gone)
        if container.essential and not task.stop_requested and not task.suspending:
            # An essential container exited: ECS stops the task's other containers.
            task.stop_reason = task.stop_reason or "Essential container in task exited"
            self._stop_async(task)

    def _finish(self, task: LocalTask) -> None:
        with self._lock:
            if task.stopped_at is None:
                task.stopped_at = datetime.datetime.now(datetime.UTC)
            if not task.suspending:  # stopped: a stopped Fargate task's storage is gone
                self.registry.drop(task.record.task_id)
        task.done.set()

    def _save(self, task: LocalTask) -> None:
        with self._lock:
            if task.done.is_set() and not task.suspending:
                return  # already stopped and forgotten
            task.record.containers = [
                ContainerRecord(
                    c.name,
                    c.argv,
                    c.env,
                    c.pid if c.alive else None,
                    c.start_time if c.alive else None,
                    str(c.cwd or ""),
                )
                for c in task.containers
            ]
            self.registry.save(task.record)

    def stop(self, arn: str, reason: str = "", user: bool = True, timeout: float = STOP_TIMEOUT_S) -> None:
        task = self.tasks.get(arn)
        if task is None:
            return
        if user:
            task.stop_requested = True
            task.stop_reason = reason or "Task stopped by user"
        task.stopping = True  # containers still waiting for their dependencies never start
        task.changed.set()
        live = [c for c in task.containers if c.alive]
        for container in live:
            _signal(container, signal.SIGTERM)
            _signal(container, signal.SIGCONT)  # a stopped (hung) process must see the TERM too
        for container in live:
            if not container.gone.wait(timeout):
                _signal(container, signal.SIGKILL)
                container.gone.wait(timeout)
        task.done.wait(timeout)

    def kill(self, arn: str) -> None:
        """SIGKILL the task's processes, as a crash or a lost host would (the task then stops)."""
        for container in self.tasks[arn].containers:
            if container.alive:
                _signal(container, signal.SIGKILL)
        self.tasks[arn].done.wait(timeout=STOP_TIMEOUT_S)

    def pids(self, arn: str) -> list[int]:
        """PIDs of the task's live processes."""
        task = self.tasks.get(arn)
        if task is None:
            return []
        return [c.pid for c in task.containers if c.pid is not None and c.alive]

    def stop_all(self) -> None:
        """The embedded AWS stops: worker tasks stop for good; node tasks are suspended, their data
        saved in their working dir and their record kept, to come back at the next :meth:`resume`."""
        with self._lock:
            live = [t for t in self.tasks.values() if t.running]
        nodes = [t for t in live if t.record.kind == NODE]
        # Every node's run-time state first, while all still run; then all stop at once, so a
        # cluster's survivors never outlive cluster-node-timeout and fail a stopped primary over.
        runtime = _in_threads(_runtime_args, nodes)
        jobs = [functools.partial(self.stop, t.arn, "embedded ECS shut down") for t in live if t not in nodes]
        jobs += [functools.partial(self._suspend, t, args) for t, args in zip(nodes, runtime, strict=True)]
        _in_threads(lambda job: job(), jobs)
        with self._lock:
            self.tasks.clear()

    def _suspend(self, task: LocalTask, runtime: dict[str, list[str]] | None) -> None:
        task.suspending = True
        if runtime is not None:
            task.record.runtime_args = runtime
        live = [c for c in task.containers if c.alive]
        for container in live:
            saves = "--shutdown-on-sigint" in container.argv
            if not saves and is_server(container.argv):
                LOG.warning("embedded ECS: %s runs a server without shutdown-on-sigint: its data is not saved",
                            task.arn)  # fmt: skip
            _signal(container, signal.SIGINT if saves else signal.SIGTERM)
            _signal(container, signal.SIGCONT)  # a stopped (hung) process must see it too
        for container in live:
            if not container.gone.wait(SUSPEND_TIMEOUT_S):
                LOG.warning("embedded ECS: %s did not save within %.0f s: killed", task.arn, SUSPEND_TIMEOUT_S)
                _signal(container, signal.SIGKILL)
                container.gone.wait(STOP_TIMEOUT_S)
        task.done.wait(STOP_TIMEOUT_S)
        task.record.state = SUSPENDED
        self._save(task)

    def resume(self, *, register: bool = True) -> list[str]:
        """Bring back the tasks of the registry (after the template is deployed: their cluster and
        task definitions exist again with the same ARNs); returns the node tasks back.

        A node task whose process still runs (the previous embedded AWS was killed) is adopted,
        any other restarts from its working dir (loading its dump.rdb, nodes.conf) at its address.
        Worker processes left behind are killed and their tasks forgotten: the operations they
        served are recovered by those operations' own recovery. ``register=False`` (no embedded
        AWS running: ``local down``) adopts what still runs and restarts nothing.
        """
        back: list[str] = []
        for record in self.registry.load_all():
            if record.arn in self.tasks:
                continue
            if record.kind != NODE:
                _kill_orphans(record)
                self.registry.drop(record.task_id)
                continue
            try:
                if self._resume(record, register):
                    back.append(record.arn)
            except Exception:  # one task that cannot come back must not keep the others down
                LOG.exception("embedded ECS: task %s could not be resumed", record.arn)
        return back

    def _resume(self, record: TaskRecord, register: bool) -> bool:
        model = _restore_model(record) if register else None
        if register and model is None:
            LOG.warning("embedded ECS: task %s left suspended: its cluster or task definition %s is gone",
                        record.arn, record.task_definition_arn)  # fmt: skip
            return False
        workdir, log_dir = self.registry.make_dirs(record.task_id)
        task = LocalTask(arn=record.arn, address=record.address, workdir=workdir, log_dir=log_dir, record=record)
        for saved in record.containers:
            task.containers.append(LocalContainer(saved.name, saved.argv, {**saved.env, **self.base_env},
                                                  cwd=Path(saved.cwd) if saved.cwd else None))  # fmt: skip
        with self._lock:
            self.tasks[record.arn] = task
        for container, saved in zip(task.containers, record.containers, strict=True):
            if not is_server(container.argv):
                # A node task's helper (its seed) did its work before the server started: it
                # does not run again; one a killed embedded AWS left running is killed.
                _kill_orphans(TaskRecord(**{**record.__dict__, "containers": [saved]}))
                container.essential = False
                container.gone.set()
                continue
            if record.state == RUNNING and self._adopt(task, container, saved):
                continue
            if register:
                self._spawn(task, container, record.runtime_args.get(container.name))
        if not task.running:
            if register:
                task.stop_reason = "Essential container in task exited"
                self._finish(task)
            else:
                with self._lock:  # nothing of it runs: it stays suspended, to start at the next up
                    del self.tasks[record.arn]
                    record.state = SUSPENDED
                    record.containers = [ContainerRecord(c.name, c.argv, c.env, cwd=c.cwd) for c in record.containers]
                    self.registry.save(record)
            return False
        record.state = RUNNING
        self._save(task)
        if model is not None:
            self.apply(model)
        return True

    # -- what DescribeTasks reports --
    def apply(self, task: Any) -> None:
        local = self.tasks.get(task.task_arn)
        if local is None:
            return
        stopped = local.done.is_set()
        waiting = any(c.pending and c.essential for c in local.containers)
        task._local_status = "STOPPED" if stopped else "PENDING" if waiting else "RUNNING"
        task.desired_status = "STOPPED" if stopped or local.stop_requested else "RUNNING"
        if stopped:
            task.stop_code = "UserInitiated" if local.stop_requested else "EssentialContainerExited"
            task.stopped_reason = local.stop_reason or "Essential container in task exited"
            task.stopped_at = local.stopped_at
        _report_network(task, local)
        for model, container in zip(task.containers, local.containers, strict=False):
            model.last_status = "STOPPED" if container.gone.is_set() else "PENDING" if container.pending else "RUNNING"
            if container.exit_code is not None:
                model.exit_code = model.exitCode = container.exit_code
            if container.reason:
                model.reason = container.reason


def _volume_dirs(workdir: Path, volumes: list[dict[str, Any]]) -> dict[str, Path]:
    """Task volume name -> its directory (a Fargate task's volumes live as long as the task)."""
    dirs = {}
    for volume in volumes:
        name = str(volume.get("name") or "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", name):
            raise ContainerImageError(f"task volume name {name!r} is not valid")
        if volume.get("host") or volume.get("efsVolumeConfiguration") or volume.get("dockerVolumeConfiguration"):
            raise ContainerImageError(f"task volume {name!r}: only task storage runs here (no host, EFS, Docker)")
        dirs[name] = workdir / "volumes" / name
    return dirs


def _mounts(definition: dict[str, Any], volume_dirs: dict[str, Path]) -> list[tuple[str, Path]]:
    """(containerPath, local dir) of a container's mount points, longest path first."""
    mounts = []
    for point in definition.get("mountPoints") or []:
        source, path = str(point.get("sourceVolume")), str(point.get("containerPath") or "")
        if source not in volume_dirs:
            raise ContainerImageError(f"container {definition.get('name')}: mount point of unknown volume {source!r}")
        if not path.startswith("/") or path == "/":
            raise ContainerImageError(f"container {definition.get('name')}: containerPath {path!r} is not absolute")
        volume_dirs[source].mkdir(parents=True, exist_ok=True)
        mounts.append((path.rstrip("/"), volume_dirs[source]))
    return sorted(mounts, key=lambda m: -len(m[0]))


def _mapped(value: str, mounts: list[tuple[str, Path]]) -> str:
    """A container path (an argument or an environment value naming one) as the local path."""
    for path, local in mounts:
        if value == path or value.startswith(path + "/"):
            return str(local) + value[len(path) :]
    return value


def _mapped_dir(path: str, mounts: list[tuple[str, Path]]) -> Path | None:
    local = _mapped(path, mounts)
    return Path(local) if local != path else None


def _check_dependencies(container: LocalContainer, definitions: list[dict[str, Any]]) -> None:
    names = {str(d.get("name")) for d in definitions}
    for name, condition in container.depends_on:
        if name not in names or name == container.name:
            raise ContainerImageError(f"container {container.name} depends on unknown container {name!r}")
        if condition not in _CONDITIONS:
            raise ContainerImageError(
                f"container {container.name}: dependsOn condition {condition!r} (the embedded ECS runs "
                f"{', '.join(_CONDITIONS)})"
            )


def _dependencies_met(task: LocalTask, container: LocalContainer) -> bool | str | None:
    """True: start it; a text: why it never can; None: not yet."""
    for name, condition in container.depends_on:
        other = task.container(name)
        assert other is not None  # checked at start
        if other.pending:
            return None
        started = other.pid is not None
        if not other.gone.is_set():
            if condition == "START" and started:
                continue
            return None
        if not started:
            return f"container {name} never started ({other.reason})"
        if condition == "SUCCESS" and other.exit_code not in (0, None):
            return f"container {name} exited with code {other.exit_code}, condition SUCCESS"
    return True


def _signal(container: LocalContainer, sig: int) -> None:
    if container.pid is not None and container.alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(container.pid, sig)  # the whole group: a server's save child too


def _wait_readable(fd: int, timeout_s: float | None) -> bool:
    """A pidfd turns readable when its process exits (poll, not select: any fd number)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout_s is None else int(timeout_s * 1000)))


def _in_threads(work: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    results: list[Any] = [None] * len(items)

    def run(index: int) -> None:
        results[index] = work(items[index])

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(items))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@functools.cache
def _saves_on_sigint(binary: str) -> bool:
    """shutdown-on-sigint came with Redis 7.0 (Valkey has it from its first release)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    match = re.search(r"\bv=(\d+)\.", out)
    return bool(match) and (int(match.group(1)) >= 7 or "Valkey" in out)


def _option(argv: list[str], name: str) -> str | None:
    """The last value of ``--name`` in a server's argv (the last one wins, as in redis-server)."""
    value = None
    for index, arg in enumerate(argv[:-1]):
        if arg == f"--{name}":
            value = argv[index + 1]
    return value


def _runtime_args(task: LocalTask) -> dict[str, list[str]] | None:
    """Per container, the argv that gives the server back what it was told at run time: the
    primary it replicates (REPLICAOF; a cluster's is in its nodes.conf) and the address it
    announces. Read over the node's own port with the credentials of its command (AUTH, TLS);
    None if it cannot be read (the record keeps what it had)."""
    found: dict[str, list[str]] = {}
    for container in task.containers:
        if not container.alive or not is_server(container.argv):
            continue
        argv = container.argv
        tls_port = int(_option(argv, "tls-port") or 0)
        ssl: dict[str, Any] = {}
        if tls_port:
            ssl = {"ssl": True, "ssl_cert_reqs": "none", "ssl_check_hostname": False}
            cert, key = _option(argv, "tls-cert-file"), _option(argv, "tls-key-file")
            if cert and key:  # its own certificate as the client's too (tls-auth-clients yes)
                cwd = container.cwd or task.workdir
                ssl.update(ssl_certfile=str(cwd / cert), ssl_keyfile=str(cwd / key))
        port = tls_port or int(_option(argv, "port") or NODE_PORT)
        try:
            with redis.Redis(host=task.address, port=port, password=_option(argv, "requirepass"),
                             socket_timeout=5, socket_connect_timeout=5, decode_responses=True,
                             **ssl) as conn:  # fmt: skip
                replication = conn.info("replication")
                announced = conn.config_get("replica-announce-ip", "cluster-announce-ip")
        except (redis.RedisError, OSError) as exc:
            LOG.warning("embedded ECS: run-time state of %s not read (%s)", task.arn, exc)
            return None
        args: list[str] = []
        if replication.get("role") == "slave" and _option(argv, "cluster-enabled") != "yes":
            args += ["--replicaof", str(replication["master_host"]), str(replication["master_port"])]
        for name, value in sorted(announced.items()):
            if value:
                args += [f"--{name}", value]
        found[container.name] = args
    return found


def _kill_orphans(record: TaskRecord) -> None:
    """Kill what is left of a worker task of a previous run of the embedded AWS (checked: same process)."""
    for saved in record.containers:
        if not saved.pid or not ecs_registry.same_process(saved.pid, saved.start_time, saved.argv):
            continue
        try:
            pidfd = os.pidfd_open(saved.pid)
        except OSError:
            continue
        try:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(saved.pid, signal.SIGKILL)
            _wait_readable(pidfd, STOP_TIMEOUT_S)
        finally:
            os.close(pidfd)
        LOG.warning("embedded ECS: killed process %s of worker task %s left by a previous run", saved.pid, record.arn)


def _restore_model(record: TaskRecord) -> Any | None:
    """The task back in moto's ECS backend with its ARN, or None if its cluster or definition is gone."""
    from moto.ecs.models import Task, ecs_backends

    _, _, _, region, account, _ = record.arn.split(":", 5)
    backend = ecs_backends[account][region]
    try:
        cluster = backend._get_cluster(record.cluster_arn)
        definition = backend.describe_task_definition(record.task_definition_arn)
    except Exception:  # moto's ClusterNotFound / ClientException for an unknown definition
        return None
    if definition.arn != record.task_definition_arn:
        return None
    net = record.network_configuration
    if definition.network_mode == "awsvpc":
        net = _known_subnet(backend, net)
    model = Task(
        cluster, definition, None, backend._calculate_task_resource_requirements(definition), backend,
        group=record.group, launch_type=record.launch_type, overrides=record.overrides,
        started_by=record.started_by, tags=record.tags, networking_configuration=net,
        platform_version=record.platform_version,
    )  # fmt: skip
    model.id = record.task_id
    _model_containers(model, definition)
    if model.task_arn != record.arn:  # another ARN format setting than the one that made it
        return None
    backend.tasks.setdefault(cluster.name, {})[model.task_arn] = model
    return model


def _model_containers(task: Any, definition: Any) -> None:
    """One container per container definition in moto's task (it models the first one only),
    so DescribeTasks reports each container's status, exit code and reason, as ECS does."""
    from moto.ecs.models import Container

    containers = []
    for container_def in definition.container_definitions:
        model = Container(definition)
        model.image, model.name = container_def.get("image"), container_def.get("name")
        model.cpu, model.memory = container_def.get("cpu"), container_def.get("memory")
        model.environment, model.command = container_def.get("environment"), container_def.get("command")
        del model.exitCode  # moto's 0 before the container ran; ECS has no exit code until it exits
        containers.append(model)
    task.containers = containers


def _record_of(model: Any) -> TaskRecord:
    """What RunTask was given for the task ``model`` (moto's), to be made again after a restart."""
    return TaskRecord(
        arn=model.task_arn,
        cluster_arn=model.cluster_arn,
        task_definition_arn=model.task_definition_arn,
        kind=WORKER,
        address="",
        workdir="",
        overrides=model.overrides or {},
        group=model.group or "",
        started_by=model.started_by or "",
        tags=list(model.tags or []),
        launch_type=model.launch_type or "",
        network_configuration=getattr(model, "network_configuration", None),
        platform_version=model.platform_version,
    )


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
            _model_containers(task, definition)
            task_role = (overrides or {}).get("taskRoleArn") or getattr(definition, "task_role_arn", None) or ""
            runner.start(_record_of(task), definition.container_definitions, str(task_role), definition.volumes)
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
