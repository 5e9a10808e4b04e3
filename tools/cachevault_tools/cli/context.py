"""Which AWS the CLI talks to, and the local embedded AWS as a background service."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError
from cachevault.core import stack as stack_info
from cachevault.core.errors import CacheVaultError
from cachevault.core.settings import Settings
from cachevault.ops.control_plane import ControlPlane, StillRunning

from cachevault_tools.local.redis_process import process_alive

UP_TIMEOUT_S = 90
# Every node saves its data before the server exits (cachevault_tools/local/ecs.py SUSPEND_TIMEOUT_S).
DOWN_TIMEOUT_S = 150
CACHE_TAG = "cachevault:cache"  # the tag RunTask gives a cache's node tasks (nodes/restore_targets.py)


class NotRunning(CacheVaultError):
    code = "LocalNotRunning"


def quiet_libraries() -> None:
    # moto logs every caught task failure with a full traceback; the CLI reports errors itself.
    for name in ("moto", "botocore", "werkzeug", "aws_xray_sdk"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def service_error(exc: Exception) -> CacheVaultError:
    """Any failure as the ``An error occurred (Code)`` a user reads; never a traceback.

    botocore's own errors keep their code (``EndpointConnectionError``, the service's
    ``Error.Code``); anything else is an ``InternalFailure`` naming what broke.
    """
    if isinstance(exc, CacheVaultError):
        return exc
    if isinstance(exc, EndpointConnectionError):
        err = CacheVaultError(
            f"{exc}: the AWS endpoint is not answering. For the embedded AWS, see `cachevault local status` "
            "and start it with `cachevault local up`; operations already started resume their record there."
        )
        err.code = "EndpointConnectionError"
        return err
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        err = CacheVaultError(str(error.get("Message") or exc))
        err.code = str(error.get("Code") or "ClientError")
        return err
    if isinstance(exc, BotoCoreError):
        err = CacheVaultError(str(exc))
        err.code = type(exc).__name__
        return err
    err = CacheVaultError(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    err.code = "InternalFailure"
    return err


def gave_up_waiting(err: StillRunning, operation: str, follow: str) -> int:
    """The line for a wait that ran out: nothing failed, the operation goes on; how to follow it."""
    print(
        f"Stopped waiting: {operation} is still running and continues without this command. "
        f"Follow it with: {follow}  (execution {err.execution_arn})",
        file=sys.stderr,
    )
    return 255  # the AWS CLI's exit code when a waiter gives up


def resolve_stack() -> stack_info.StackInfo:
    """The local service's stack if it runs; else the CloudFormation stack (LocalStack/AWS)."""
    local = stack_info.load_local()
    if local is not None and process_alive(local.pid):
        return local
    if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("CACHEVAULT_TARGET") or os.environ.get("AWS_PROFILE"):
        return stack_info.from_cloudformation()
    raise NotRunning("the local embedded AWS is not running: start it with `cachevault local up`.")


def control_plane() -> ControlPlane:
    quiet_libraries()
    info = resolve_stack()
    info.apply()
    return ControlPlane(info, Settings.from_env())


def local_up(port: int) -> stack_info.StackInfo:
    from cachevault_tools.cli import extras

    extras.require("local", "the embedded AWS (`cachevault local up`)")
    settings = Settings.from_env()
    running = stack_info.load_local(settings)
    if running is not None and process_alive(running.pid):
        return running
    log_dir = settings.state_dir / "local"
    log_dir.mkdir(parents=True, exist_ok=True)
    stack_info.local_stack_file(settings).unlink(missing_ok=True)
    with open(log_dir / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cachevault_tools.local.server",
                "--port",
                str(port),
                "--state-dir",
                str(settings.state_dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the CLI; stopped by `local down` via its PID
            # Two malloc arenas: with glibc's default (8 per core) the threaded server's peak RSS
            # over 16 uploaded parts ranged 97-180 MB from run to run; with two, 119-120 MB
            # (tests/integration/test_s3_files.py). A value set by the user wins.
            env={"MALLOC_ARENA_MAX": "2", **os.environ},
        )
    deadline = time.monotonic() + UP_TIMEOUT_S
    while time.monotonic() < deadline:
        info = stack_info.load_local(settings)
        if info is not None and info.pid == proc.pid:
            return info
        if proc.poll() is not None:
            raise CacheVaultError(f"the local server exited ({proc.returncode}); see {log_dir / 'server.log'}")
        time.sleep(0.2)
    proc.terminate()
    raise CacheVaultError(f"the local server did not come up within {UP_TIMEOUT_S} s; see {log_dir / 'server.log'}")


def local_down() -> list[str]:
    """Stop the local server (by its PID): cache nodes stop with their data kept and come back at
    the next ``local up`` (deleting a cache's data takes ``cache delete``). Returns what stopped."""
    settings = Settings.from_env()
    stopped = []
    running_before = {name for name, nodes in local_caches(settings).items() if nodes["Running"]}
    info = stack_info.load_local(settings)
    if info is not None and info.pid and process_alive(info.pid) and _is_our_server(info.pid):
        os.kill(info.pid, signal.SIGTERM)  # it saves every node's data before it exits
        deadline = time.monotonic() + DOWN_TIMEOUT_S
        while process_alive(info.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped.append(f"embedded AWS (pid {info.pid})")
    else:
        # Killed, not stopped: the nodes it left still run; they are saved and stopped the same way.
        from cachevault_tools.local import ecs

        orphans = ecs.TaskRunner().open(ecs_dir(settings))
        orphans.resume(register=False)
        orphans.stop_all()
    stack_info.local_stack_file(settings).unlink(missing_ok=True)
    for name, nodes in sorted(local_caches(settings).items()):
        if name in running_before and nodes["Suspended"]:
            stopped.append(f"cache {name} ({nodes['Suspended']} nodes stopped, data kept)")
    return stopped


def ecs_dir(settings: Settings) -> Path:
    return settings.state_dir / "ecs"  # the embedded ECS's task registry (cachevault_tools/local/ecs_registry.py)


def local_caches(settings: Settings | None = None) -> dict[str, dict[str, int]]:
    """Caches whose nodes are tasks of the embedded ECS (by the RunTask tag ``cachevault:cache``),
    with how many of their node tasks run and how many are suspended (data kept until ``local up``)."""
    from cachevault_tools.local.ecs_registry import NODE, RUNNING, TaskRegistry, is_server, same_process

    found: dict[str, dict[str, int]] = {}
    for record in TaskRegistry(ecs_dir(settings or Settings.from_env())).load_all():
        name = next((t.get("value") for t in record.tags if t.get("key") == CACHE_TAG), None)
        if record.kind != NODE or not name:
            continue
        counts = found.setdefault(name, {"Running": 0, "Suspended": 0})
        live = record.state == RUNNING and all(
            same_process(c.pid, c.start_time, c.argv) for c in record.containers if is_server(c.argv)
        )  # a record left "running" by a killed embedded AWS whose process is gone: only its data is left
        counts["Running" if live else "Suspended"] += 1
    return found


def _is_our_server(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"cachevault_tools.local.server" in cmdline
