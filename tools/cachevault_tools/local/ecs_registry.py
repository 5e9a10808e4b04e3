"""The embedded ECS's durable task registry, under ``$CACHEVAULT_HOME/ecs/``.

What RunTask started outlives the process running the embedded AWS: a graceful stop suspends
node tasks (their data saved in their working dir) and the next start brings them back with
the same task ARN and address; after a SIGKILL the next start finds their processes still
running and adopts them. Both need, per task, what RunTask was given and what it started:

* ``registry/<task id>.json``: one :class:`TaskRecord` (mode 0600: a container's command and
  environment may hold secrets, a requirepass or a CA), written atomically (temp file,
  fsync, rename) so a kill at any moment leaves the old record or the new one;
* ``tasks/<task id>/``: the task's working dir (a node's dump.rdb and nodes.conf), removed when
  the task stops, as a stopped Fargate task's storage is gone;
* ``logs/<task id>/<container>.log``: the containers' output, kept like a log group's streams.

A PID alone does not name a process (PIDs are reused): :func:`same_process` also checks the
start time (``/proc/<pid>/stat`` field 22) and the executable and command the record holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)

NODE = "node"  # a redis-server/valkey-server task: suspended and resumed with its data
WORKER = "worker"  # anything else (capture/load workers): stopped for good
RUNNING = "running"
SUSPENDED = "suspended"


def is_server(argv: list[str]) -> bool:
    """The container runs a cache server (a node task's others are helpers that ran before it)."""
    return bool(argv) and Path(argv[0]).name in ("redis-server", "valkey-server")


@dataclass
class ContainerRecord:
    name: str
    argv: list[str]  # the program as started (the task's command mapped to a local binary)
    env: dict[str, str]
    pid: int | None = None
    start_time: int | None = None  # clock ticks after boot: with the PID, names one process
    cwd: str = ""  # its working dir when not the task's (a server working in a mounted volume)


@dataclass
class TaskRecord:
    arn: str
    cluster_arn: str
    task_definition_arn: str
    kind: str
    address: str
    workdir: str
    overrides: dict[str, Any] = field(default_factory=dict)
    group: str = ""
    started_by: str = ""
    tags: list[dict[str, str]] = field(default_factory=list)
    launch_type: str = ""
    network_configuration: dict[str, Any] | None = None
    platform_version: str | None = None
    containers: list[ContainerRecord] = field(default_factory=list)
    state: str = RUNNING
    # Per container, what the server was told at run time and must be told again when it
    # comes back (REPLICAOF, announce addresses): argv appended on resume.
    runtime_args: dict[str, list[str]] = field(default_factory=dict)

    @property
    def task_id(self) -> str:
        return self.arn.rsplit("/", 1)[-1]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskRecord:
        containers = [ContainerRecord(**c) for c in data.pop("containers", [])]
        return cls(**data, containers=containers)


class TaskRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.records_dir = root / "registry"
        self.tasks_dir = root / "tasks"
        self.logs_dir = root / "logs"

    def workdir(self, task_id: str) -> Path:
        return self.tasks_dir / task_id

    def log_dir(self, task_id: str) -> Path:
        return self.logs_dir / task_id

    def make_dirs(self, task_id: str) -> tuple[Path, Path]:
        for path in (self.root, self.records_dir, self.tasks_dir, self.logs_dir):
            path.mkdir(parents=True, mode=0o700, exist_ok=True)
        workdir, logs = self.workdir(task_id), self.log_dir(task_id)
        workdir.mkdir(mode=0o700, exist_ok=True)
        logs.mkdir(mode=0o700, exist_ok=True)
        return workdir, logs

    def save(self, record: TaskRecord) -> None:
        self.records_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.records_dir, prefix=".tmp-", suffix=".json")  # mode 0600
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(asdict(record), out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.records_dir / f"{record.task_id}.json")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.records_dir)

    def drop(self, task_id: str) -> None:
        """Forget the task and remove its storage (its logs stay)."""
        (self.records_dir / f"{task_id}.json").unlink(missing_ok=True)
        shutil.rmtree(self.workdir(task_id), ignore_errors=True)

    def load_all(self) -> list[TaskRecord]:
        records = []
        for path in sorted(self.records_dir.glob("*.json")) if self.records_dir.is_dir() else []:
            try:
                records.append(TaskRecord.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as exc:  # a record from another version: leave it be
                LOG.warning("embedded ECS: task record %s unreadable (%s); ignored", path, exc)
        return records


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot; None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # comm (field 2) may hold spaces and parentheses
    return None if fields[0] == "Z" else int(fields[19])


def same_process(pid: int | None, started: int | None, argv: list[str]) -> bool:
    """``pid`` is still the process a record names: same start time, same program.

    The command line is matched on its program only: redis-server rewrites its own
    (``redis-server 127.0.0.5:6379``), and /proc/<pid>/exe names the real binary
    (redis-server is a link to redis-check-rdb on Debian).
    """
    if not pid or started is None or start_time(pid) != started:
        return False
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    program = os.fsencode(os.path.basename(argv[0]))
    first = os.path.basename(cmdline[0].split(b" ", 1)[0]) if cmdline and cmdline[0] else b""
    return os.path.realpath(argv[0]) == exe and first == program
