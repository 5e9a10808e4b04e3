"""Node tasks outlive the embedded AWS: `local down` keeps their data, `local up` brings them back.

A graceful stop of the embedded AWS suspends node tasks (data saved in their working dir under
``$CACHEVAULT_HOME/ecs/``) and the next start on the same state dir brings them back with the
same task ARN and address; a SIGKILLed embedded AWS leaves node processes running that the
next start adopts (same PID), while worker processes it left are killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cachevault.catalog import caches
from cachevault.core import stack as stack_info
from cachevault.core.aws import client
from cachevault.nodes import restore_targets
from cachevault.nodes.credentials import Credentials
from cachevault_tools.local import ecs
from cachevault_tools.local.ecs_registry import NODE, SUSPENDED, TaskRecord, TaskRegistry, is_server, start_time
from cachevault_tools.local.embedded import EnvPatch
from cachevault_tools.local.environment import LocalEnvironment
from cachevault_tools.local.redis_process import free_port

from tests.product_fixtures import fill, fill_cluster, sync_replicas, wait_until
from tests.tls_fixtures import make_tls_files

PASSWORD = "correct-horse-battery-staple"
# Task addresses are not in the test certificate's names: encrypted, the name left unchecked.
SECURED = {"password": PASSWORD, "ssl": True, "ssl_cert_reqs": "none", "ssl_check_hostname": False}


def _conn(address: str, **options: Any) -> redis.Redis:
    host, _, port = address.rpartition(":")
    return redis.Redis(host=host, port=int(port), socket_timeout=10, socket_connect_timeout=2, **options)


def _ready(address: str, **options: Any) -> bool:
    try:
        with _conn(address, **options) as conn:
            return bool(conn.ping()) and int(conn.info("persistence")["loading"]) == 0
    except (redis.RedisError, OSError):
        return False


def _digest(address: str, **options: Any) -> tuple[Any, int]:
    with _conn(address, **options) as conn:
        return conn.execute_command("DEBUG", "DIGEST"), conn.dbsize()


def _describe(arns: list[str]) -> dict[str, dict[str, Any]]:
    found = client("ecs").describe_tasks(cluster=os.environ["ECS_CLUSTER"], tasks=arns)["tasks"]
    return {t["taskArn"]: t for t in found}


def _gone(pid: int) -> bool:
    return start_time(pid) is None  # exited (a zombie of another parent counts as gone)


def _server_processes(address: str) -> list[int]:
    """PIDs of every redis-server serving ``address``:6379 (its process title names it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            program = os.path.basename(title.split(" ", 1)[0])
            if program == "redis-server" and f"{address}:6379" in title and not _gone(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state dir whose task processes are all gone after the test, whatever it left."""
    home = tmp_path / "home"
    yield home
    for record in TaskRegistry(home / "ecs").load_all():
        for container in record.containers:
            if container.pid and start_time(container.pid) == container.start_time:
                os.killpg(container.pid, signal.SIGKILL)


def test_node_tasks_come_back_with_their_data_after_a_stop(state_dir: Path) -> None:
    env = LocalEnvironment(state_dir=state_dir, log_level="WARNING")
    env.start()
    try:
        plain = caches.create_local_cache("plain", replicas=1)
        clustered = caches.create_local_cache("clustered", cluster_mode=True, num_shards=3, replicas=0)
        tls = make_tls_files(state_dir.parent / "tls")
        secured = caches.create_local_cache(  # AUTH and TLS: what suspending reads over its port
            "secured", replicas=1, auth_password=PASSWORD, tls={**tls.fleet(), "server_name": "localhost"}
        )
        fill(plain["Endpoints"][0], keys=1500)
        sync_replicas(plain["Endpoints"][0], 1)
        fill_cluster(clustered, keys=1500)
        options = {n["Address"]: SECURED for n in secured["Nodes"]}
        with _conn(secured["Endpoints"][0], **SECURED) as conn:
            conn.mset({f"s:{i}": os.urandom(32) for i in range(500)})
            assert conn.execute_command("WAIT", 1, 10000) == 1
        nodes = {n["TaskArn"]: n["Address"] for c in (plain, clustered, secured) for n in c["Nodes"]}
        digests = {a: _digest(a, **options.get(a, {})) for a in nodes.values()}
        pids = [pid for arn in nodes for pid in ecs.RUNNER.pids(arn)]
        assert len(pids) == 7
    finally:
        env.stop()

    assert all(_gone(pid) for pid in pids)
    records = {r.arn: r for r in TaskRegistry(state_dir / "ecs").load_all()}
    assert set(records) == set(nodes) and all(r.state == SUSPENDED and r.kind == NODE for r in records.values())
    for record in records.values():
        (server,) = [c for c in record.containers if is_server(c.argv)]  # its seed had nothing to serve
        assert (Path(server.cwd or record.workdir) / "dump.rdb").is_file()
        path = state_dir / "ecs" / "registry" / f"{record.task_id}.json"
        assert path.stat().st_mode & 0o777 == 0o600  # the command holds the requirepass
    replicas = [n for c in (plain, secured) for n in c["Nodes"] if n["Role"] == "replica"]
    assert all("--replicaof" in records[n["TaskArn"]].runtime_args["node"] for n in replicas)

    env = LocalEnvironment(state_dir=state_dir, log_level="WARNING")
    env.start()
    try:
        tasks = _describe(list(nodes))
        assert {arn: restore_targets.task_ip(t) for arn, t in tasks.items()} == {
            arn: address.rpartition(":")[0] for arn, address in nodes.items()
        }
        assert all(t["lastStatus"] == "RUNNING" for t in tasks.values())
        listed = client("ecs").list_tasks(cluster=os.environ["ECS_CLUSTER"])["taskArns"]
        assert set(nodes) <= set(listed)
        for address in nodes.values():
            wait_until(lambda a=address: _ready(a, **options.get(a, {})), 30, f"{address} loaded")
        assert {a: _digest(a, **options.get(a, {})) for a in nodes.values()} == digests
        with pytest.raises(redis.AuthenticationError):  # still AUTH-protected
            _digest(secured["Endpoints"][0], **{**SECURED, "password": "wrong-password-wrong"})

        for node in clustered["Nodes"]:  # nodes.conf: the cluster forms again
            wait_until(
                lambda a=node["Address"]: "cluster_state:ok" in _conn(a).execute_command("CLUSTER", "INFO").decode(),
                30,
                f"{node['Address']} cluster ok",
            )
        for cache, replica in zip((plain, secured), replicas, strict=True):  # re-attached to their primaries
            with _conn(replica["Address"], **options.get(replica["Address"], {})) as conn:
                wait_until(lambda c=conn: c.info("replication").get("master_link_status") == "up", 30, "link up")
                assert conn.info("replication")["master_host"] == cache["Endpoints"][0].rpartition(":")[0]

        # StopTask stops it for good: its storage goes, as a stopped Fargate task's does.
        arn = secured["Nodes"][0]["TaskArn"]
        client("ecs").stop_task(cluster=os.environ["ECS_CLUSTER"], task=arn, reason="test over")
        assert _describe([arn])[arn]["lastStatus"] == "STOPPED"
        assert not Path(records[arn].workdir).exists()
        assert arn not in {r.arn for r in TaskRegistry(state_dir / "ecs").load_all()}
    finally:
        env.stop()


def _start_server(state: Path, port: int) -> tuple[subprocess.Popen[bytes], stack_info.StackInfo]:
    """The embedded AWS in a process of its own, as `cachevault local up` starts it."""
    state.mkdir(parents=True)
    with open(state / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cachevault_tools.local.server", "--port", str(port), "--state-dir", str(state)],
            env={**os.environ, "CACHEVAULT_HOME": str(state)},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    stack = state / "local" / "stack.json"

    def up() -> stack_info.StackInfo | None:
        assert proc.poll() is None, (state / "server.log").read_text()[-3000:]
        info = stack_info.StackInfo(**json.loads(stack.read_text())) if stack.exists() else None
        return info if info is not None and info.pid == proc.pid else None

    return proc, wait_until(up, 90, "the embedded AWS server to come up", interval=0.2)


def _registry(state: Path) -> dict[str, TaskRecord]:
    return {r.arn: r for r in TaskRegistry(state / "ecs").load_all()}


def test_nodes_left_by_a_killed_embedded_aws_are_adopted_and_workers_killed(state_dir: Path) -> None:
    proc, info = _start_server(state_dir, free_port())
    patch = EnvPatch()
    try:
        for name, value in {**info.env(), **(info.credentials or {}), "AWS_DEFAULT_REGION": "us-east-1"}.items():
            patch.set(name, value)
        patch.set("AWS_SESSION_TOKEN", None)
        node, dead = restore_targets.start_node_tasks(
            "orphan", ["orphan-0001-001", "orphan-0002-001"], engine="redis", cluster_mode=False,
            creds=Credentials(), tls=None,
        )  # fmt: skip
        address = f"{node.host}:{node.port}"
        fill(address, keys=1000)
        digest = _digest(address)
        ecs_client, cluster = client("ecs"), os.environ["ECS_CLUSTER"]
        worker_definition = ecs_client.register_task_definition(
            family="orphan-worker",
            requiresCompatibilities=["FARGATE"],
            networkMode="awsvpc",
            cpu="256",
            memory="512",
            containerDefinitions=[{"name": "worker", "image": "cachevault-worker:latest", "memory": 512,
                                   "command": ["python", "-c", "import time; time.sleep(300)"]}],
        )["taskDefinition"]["taskDefinitionArn"]  # fmt: skip
        worker_arn = ecs_client.run_task(
            cluster=cluster,
            taskDefinition=worker_definition,
            launchType="FARGATE",
            networkConfiguration={"awsvpcConfiguration": {"subnets": ["subnet-local"]}},
        )["tasks"][0]["taskArn"]
        records = _registry(state_dir)
        (node_pid,) = [c.pid for c in records[node.task_arn].containers if is_server(c.argv)]
        (worker_pid,) = [c.pid for c in records[worker_arn].containers]
        (dead_pid,) = [c.pid for c in records[dead.task_arn].containers if is_server(c.argv)]
        assert node_pid and worker_pid and dead_pid

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        patch.restore()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not _gone(node_pid) and not _gone(worker_pid)  # nobody stopped them
    os.killpg(dead_pid, signal.SIGKILL)  # and one node dies while no embedded AWS runs
    wait_until(lambda: _gone(dead_pid), 10, "the node to die")

    env = LocalEnvironment(state_dir=state_dir, log_level="WARNING")
    env.start()
    try:
        assert ecs.RUNNER.pids(node.task_arn) == [node_pid]  # adopted, not started twice
        assert _server_processes(node.host) == [node_pid]
        assert _gone(worker_pid)
        assert set(_registry(state_dir)) == {node.task_arn, dead.task_arn}
        (restarted,) = ecs.RUNNER.pids(dead.task_arn)  # started again, at its address
        assert restarted != dead_pid and _server_processes(dead.host) == [restarted]
        wait_until(lambda: _ready(f"{dead.host}:{dead.port}"), 30, "the dead node restarted")
        task = _describe([node.task_arn])[node.task_arn]
        assert task["lastStatus"] == "RUNNING" and restore_targets.task_ip(task) == node.host
        assert _digest(address) == digest

        # Not our child, still watched: StopTask ends it and the task stops, storage gone.
        workdir = Path(_registry(state_dir)[node.task_arn].workdir)
        client("ecs").stop_task(cluster=os.environ["ECS_CLUSTER"], task=node.task_arn, reason="test over")
        assert _describe([node.task_arn])[node.task_arn]["lastStatus"] == "STOPPED"
        assert _gone(node_pid) and not workdir.exists()
    finally:
        env.stop()


def _cli(home: Path, *args: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["CACHEVAULT_HOME"] = str(home)
    proc = subprocess.run(
        [sys.executable, "-m", "cachevault_tools.cli", *args, "--json"],
        capture_output=True, text=True, timeout=180, env=env, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"cachevault {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


def test_local_down_keeps_cache_data_for_the_next_local_up(state_dir: Path) -> None:
    up = _cli(state_dir, "local", "up", "--port", str(free_port()))
    try:
        group = _cli(state_dir, "cache", "create", "kept", "--replicas", "0")["ReplicationGroup"]
        primary = group["NodeGroups"][0]["PrimaryEndpoint"]
        address = f"{primary['Address']}:{primary['Port']}"
        fill(address, keys=800)
        digest = _digest(address)
        assert _cli(state_dir, "local", "status")["LocalCacheNodes"] == {"kept": {"Running": 1, "Suspended": 0}}
        (pid,) = [c.pid for r in _registry(state_dir).values() for c in r.containers if is_server(c.argv)]
        os.kill(up["Pid"], signal.SIGKILL)  # the embedded AWS dies; its node runs on
        wait_until(lambda: _gone(up["Pid"]), 10, "the embedded AWS to die")
        assert not _gone(pid)

        # `local down` with no server: the node it left is saved and stopped all the same.
        down = _cli(state_dir, "local", "down")
        assert down["Stopped"] == ["cache kept (1 nodes stopped, data kept)"]
        assert _gone(pid)
        assert _cli(state_dir, "local", "status")["LocalCacheNodes"] == {"kept": {"Running": 0, "Suspended": 1}}

        up = _cli(state_dir, "local", "up", "--port", str(free_port()))
        wait_until(lambda: _ready(address), 30, "the node back with its data")
        assert _digest(address) == digest
        down = _cli(state_dir, "local", "down")
        assert down["Stopped"] == [f"embedded AWS (pid {up['Pid']})", "cache kept (1 nodes stopped, data kept)"]
        assert _server_processes(primary["Address"]) == []
    finally:
        if not _gone(up["Pid"]):
            _cli(state_dir, "local", "down")
