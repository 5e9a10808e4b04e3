"""The `cachevault local up` service as a user runs it: CLI processes against one state dir.

Every command is a fresh ``python -m cachevault_tools.cli`` process with ``CACHEVAULT_HOME``
set to the test's state dir (and none of the test process's ``AWS_*`` variables), so nothing
is shared in memory with the service. Used by test_cli.py, test_durable_local.py and
test_crash_recovery.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import redis
from cachevault.core import stack as stack_info
from cachevault_tools.local.ecs_registry import TaskRegistry, start_time
from cachevault_tools.local.embedded import EnvPatch
from cachevault_tools.local.redis_process import process_alive

from tests.product_fixtures import wait_until

TIMEOUT_S = 180


def cli_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["CACHEVAULT_HOME"] = str(home)
    return {**env, **(extra or {})}


def run_cli(
    home: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``cachevault ARGS`` in a process of its own; ``env``: variables on top of this process's."""
    proc = subprocess.run(
        [sys.executable, "-m", "cachevault_tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=cli_env(home, env),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cachevault {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_json(home: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return json.loads(run_cli(home, *args, "--json", env=env).stdout)


def up(home: Path, port: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``cachevault local up``; ``env`` reaches the server it starts (CACHEVAULT_PARAMETER_OVERRIDES)."""
    started = run_json(home, "local", "up", "--port", str(port), env=env)
    assert process_alive(started["Pid"])
    return started


def server_pid(home: Path) -> int | None:
    """The service's PID from the stack file it wrote (what `local status` reads), if it runs."""
    stack = home / "local" / "stack.json"
    pid = int(json.loads(stack.read_text())["pid"]) if stack.exists() else None
    return pid if pid is not None and process_alive(pid) else None


def kill_server(home: Path) -> int:
    """SIGKILL the running service (a crash: nothing of it runs its shutdown); returns its PID.

    No CLI process (a second of start-up) between the caller's condition and the kill.
    """
    server = server_pid(home)
    assert server is not None, "the local service is not running"
    os.kill(server, signal.SIGKILL)
    wait_until(lambda: not process_alive(server), 15, "the killed service to be gone")
    return server


def point_at(home: Path, patch: EnvPatch) -> stack_info.StackInfo:
    """This process's boto3 clients and Settings at the running service (undone by ``patch.restore()``)."""
    info = stack_info.StackInfo(**json.loads((home / "local" / "stack.json").read_text()))
    variables = {**info.env(), **(info.credentials or stack_info.FAKE_CREDENTIALS)}
    for name, value in {**variables, "AWS_DEFAULT_REGION": "us-east-1", "CACHEVAULT_HOME": str(home)}.items():
        patch.set(name, value)
    patch.set("AWS_SESSION_TOKEN", None)
    return info


def aws(home: Path, service: str) -> Any:
    env = run_json(home, "local", "env")["Environment"]
    return boto3.client(
        service,
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def primary(home: Path, cache: str) -> redis.Redis:
    group = run_json(home, "cache", "describe", "--replication-group-id", cache)["ReplicationGroups"][0]
    endpoint = group["NodeGroups"][0]["PrimaryEndpoint"]
    return redis.Redis(host=endpoint["Address"], port=endpoint["Port"], socket_timeout=30)


def digest(conn: redis.Redis) -> tuple[Any, int]:
    """DEBUG DIGEST and DBSIZE; closes ``conn``."""
    try:
        return conn.execute_command("DEBUG", "DIGEST"), conn.dbsize()
    finally:
        conn.close()


def snapshot(home: Path, name: str) -> dict[str, Any]:
    return run_json(home, "snapshot", "describe", name)["Snapshots"][0]


def kill_task_processes(home: Path) -> None:
    """Teardown: whatever task process the state dir's registry names and still runs is killed."""
    for record in TaskRegistry(home / "ecs").load_all():
        for container in record.containers:
            if container.pid and start_time(container.pid) == container.start_time:
                with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                    os.killpg(container.pid, signal.SIGKILL)
