"""Where a restore (or ``cache create``) puts its data, behind one interface.

* ``ecs``: a new cache as ECS Fargate tasks running the official Redis/Valkey image (task
  definitions in template.yaml), one node per task at <task IP>:6379, wired over the network
  by the calling step: REPLICAOF, or CLUSTER ADDSLOTSRANGE/SET-CONFIG-EPOCH/MEET/REPLICATE.
  AUTH (requirepass, masterauth, an ACL user) and TLS come from the cache's record.
* ``external``: nodes the user runs, registered by endpoint and credentials. A restore
  needs every primary reachable and empty (DBSIZE 0), checked at preflight before anything
  is written; the layout (cluster mode, shards, slots) is read from the nodes; cachevault
  never starts, stops or rewires them.

No step starts a node process itself: nodes are tasks, whoever runs ECS (AWS, or the
embedded ECS of the local runtime).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from cachevault.core.aws import client
from cachevault.core.errors import CacheVaultError, InvalidParameterValue, InvalidReplicationGroupState
from cachevault.nodes import credentials as creds_mod
from cachevault.nodes import topology
from cachevault.nodes.credentials import Credentials
from cachevault.nodes.slots import even_split, format_slot_ranges, parse_slot_ranges

NODE_PORT = 6379
ENGINES = ("redis", "valkey")
DEFAULT_IMAGES = {"redis": "redis:7.0", "valkey": "valkey/valkey:8.0"}
READY_TIMEOUT_S = 120.0
_POLL_S = 0.1  # between DescribeTasks calls (an AWS API call each)
_NODE_POLL_S = 0.02  # between checks sent to the nodes themselves (one small command each)
MESH_MEET_MAX = 32  # new clusters up to this many primaries: every primary MEETs every other


class TargetNotReady(CacheVaultError):
    """Cache nodes did not start, answer or converge in time."""

    code = "CacheNodesNotReady"
    http_status = 500


class TargetNotEmpty(CacheVaultError):
    """An external restore target holds data or cannot be reached."""

    code = "InvalidReplicationGroupState"
    http_status = 400


# ---------------------------------------------------------------------------------- ECS settings
@dataclass(frozen=True)
class TaskSettings:
    cluster: str
    node_task_definitions: dict[str, str]  # engine -> task definition
    subnets: list[str]
    security_groups: list[str]
    # engine -> the definition with a seed container beside the server (restore.seed)
    seeded_node_task_definitions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> TaskSettings:
        env = os.environ
        return cls(
            cluster=env.get("ECS_CLUSTER", "cachevault-tasks"),
            node_task_definitions={
                "redis": env.get("REDIS_NODE_TASK_DEFINITION", "cachevault-redis-node"),
                "valkey": env.get("VALKEY_NODE_TASK_DEFINITION", "cachevault-valkey-node"),
            },
            subnets=_split(env.get("TASK_SUBNETS", "")),
            security_groups=_split(env.get("TASK_SECURITY_GROUPS", "")),
            seeded_node_task_definitions={
                "redis": env.get("REDIS_SEEDED_NODE_TASK_DEFINITION", "cachevault-redis-seeded-node"),
                "valkey": env.get("VALKEY_SEEDED_NODE_TASK_DEFINITION", "cachevault-valkey-seeded-node"),
            },
        )

    def network(self) -> dict[str, Any]:
        conf: dict[str, Any] = {"subnets": self.subnets, "assignPublicIp": "DISABLED"}
        if self.security_groups:
            conf["securityGroups"] = self.security_groups
        return {"awsvpcConfiguration": conf}


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def image_engine(engine: str) -> tuple[str, str, int]:
    """(engine, version, highest RDB version) of the image the node task definition runs."""
    if engine not in ENGINES:
        raise InvalidParameterValue(f"Engine must be one of {', '.join(ENGINES)}, not {engine!r}.")
    # The node task definitions run these images (template parameters RedisImage / ValkeyImage).
    image = os.environ.get(f"{engine.upper()}_IMAGE") or DEFAULT_IMAGES[engine]
    tag = image.rsplit("/", 1)[-1].partition(":")[2] or "latest"
    version = tag.split("-", 1)[0]
    if not version[:1].isdigit():
        version = "99.0" if engine == "redis" else "8.0"  # "latest": the newest engine
    return engine, version, topology.rdb_version_for(engine, version)


# ---------------------------------------------------------------------------------- nodes as tasks
@dataclass
class NodeTask:
    node_id: str
    task_arn: str
    host: str
    port: int = NODE_PORT
    role: str = "primary"


@dataclass
class ShardNodes:
    primary: NodeTask
    replicas: list[NodeTask] = field(default_factory=list)
    slots: str | None = None


@dataclass
class CacheNodes:
    """The slice of a layout ``caches.registry_record`` reads."""

    name: str
    cluster_mode: bool
    shards: list[ShardNodes]


# The CA reaches a node task as PEM text in its environment (TLS_CA_PEM_ENV); the task's
# entry writes it to this file of its working directory before the server starts.
TLS_CA_PEM_ENV = "TLS_CA_PEM"
TLS_CA_FILE = "ca.pem"


def node_environment(tls: dict[str, str] | None) -> list[dict[str, str]]:
    return [{"name": TLS_CA_PEM_ENV, "value": tls["ca_pem"]}] if tls else []


def node_command(engine: str, *, cluster_mode: bool, creds: Credentials, tls: dict[str, str] | None) -> list[str]:
    server = "valkey-server" if engine == "valkey" else "redis-server"
    # Persistence off: the data's durable copy is the snapshot; a restarted task starts empty.
    argv = [server, "--save", "", "--appendonly", "no", "--protected-mode", "no",
            # Captures (DESIGN.md): the default 5 s diskless delay dominates small syncs.
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
            # A replica that (re)syncs with a loaded primary parses the stream as it arrives (no temp RDB).
            "--repl-diskless-load", "on-empty-db",
            # DEBUG DIGEST proves a restore exact; loopback clients only (in-task on Fargate).
            "--enable-debug-command", "local"]  # fmt: skip
    if tls:
        argv += ["--port", "0", "--tls-port", str(NODE_PORT), "--tls-cert-file", tls["cert_file"],
                 "--tls-key-file", tls["key_file"], "--tls-ca-cert-file", TLS_CA_FILE,
                 "--tls-auth-clients", "no", "--tls-replication", "yes"]  # fmt: skip
        if cluster_mode:
            argv += ["--tls-cluster", "yes"]
    else:
        argv += ["--port", str(NODE_PORT)]
    if cluster_mode:
        argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"]
    if creds.password:
        argv += ["--requirepass", creds.password, "--masterauth", creds.password]
        if creds.username:
            argv += ["--user", creds.username, "on", f">{creds.password}", "~*", "&*", "+@all"]
            argv += ["--masteruser", creds.username]
    return argv


def start_node_tasks(
    cache: str,
    node_ids: list[str],
    *,
    engine: str,
    cluster_mode: bool,
    creds: Credentials,
    tls: dict[str, str] | None,
    settings: TaskSettings | None = None,
    seeds: Callable[[str], list[dict[str, str]]] | None = None,
) -> list[NodeTask]:
    """RunTask one node per id; return once every node answers PING at its task's address.

    ``seeds(node_id)``: the environment of that node's seed container (restore.seed), which
    then serves it the restore's RDB once told to (``follow_seed``).
    """
    settings = settings or TaskSettings.from_env()
    ecs = client("ecs")
    command = node_command(engine, cluster_mode=cluster_mode, creds=creds, tls=tls)
    arns: list[str] = []
    try:
        for node_id in node_ids:
            seed_env = seeds(node_id) if seeds else None
            arns.append(_run_node_task(ecs, settings, cache, node_id, engine, command, node_environment(tls), seed_env))
        hosts = _wait_running(ecs, settings.cluster, arns)
        nodes = [NodeTask(node_id, arn, hosts[arn]) for node_id, arn in zip(node_ids, arns, strict=True)]
        _wait_ping(nodes, creds)
        for node in nodes:
            _announce(node, creds, cluster_mode)
        return nodes
    except BaseException:
        stop_tasks(arns, "cache nodes did not start", settings)
        raise


def _run_node_task(
    ecs: Any,
    settings: TaskSettings,
    cache: str,
    node_id: str,
    engine: str,
    command: list[str],
    environment: list[dict[str, str]],
    seed_environment: list[dict[str, str]] | None = None,
) -> str:
    overrides = [{"name": "node", "command": command, "environment": environment}]
    definitions = settings.node_task_definitions
    if seed_environment:
        overrides.append({"name": "seed", "environment": seed_environment})
        definitions = settings.seeded_node_task_definitions
    resp = ecs.run_task(
        cluster=settings.cluster,
        taskDefinition=definitions[engine],
        launchType="FARGATE",
        networkConfiguration=settings.network(),
        group=node_task_group(cache),
        overrides={"containerOverrides": overrides},
        tags=[{"key": "cachevault:cache", "value": cache}, {"key": "cachevault:node", "value": node_id}],
    )
    if resp.get("failures") or not resp.get("tasks"):
        raise TargetNotReady(f"RunTask for node {node_id} of {cache} failed: {resp.get('failures')}")
    return str(resp["tasks"][0]["taskArn"])


def start_seeded_shard(
    cache: str,
    shard: int,
    replicas: int,
    seed: Callable[[str], list[dict[str, str]]],
    *,
    engine: str,
    creds: Credentials,
    tls: dict[str, str] | None,
    settings: TaskSettings | None = None,
) -> ShardNodes:
    """A standalone shard whose every node will load the same RDB from its task's seed container
    (``seed(node_id)``: its environment); the nodes answer, empty and not wired, on return."""
    ids = [node_id(cache, shard, member) for member in range(1 + replicas)]
    nodes = start_node_tasks(
        cache, ids, engine=engine, cluster_mode=False, creds=creds, tls=tls, settings=settings, seeds=seed
    )
    for node in nodes[1:]:
        node.role = "replica"
    return ShardNodes(nodes[0], nodes[1:])


def start_seeded_cluster(
    cache: str,
    num_shards: int,
    seed: Callable[[str, str], list[dict[str, str]]],
    node_arguments: list[str],
    *,
    engine: str,
    creds: Credentials,
    tls: dict[str, str] | None,
    settings: TaskSettings | None = None,
) -> CacheNodes:
    """The primaries of a new cluster, each loaded by its task's seed (restore.seed_cluster).

    ``seed(node_id, slots)``: that node's seed environment; ``node_arguments``: what its server
    needs for it. Returns once every task runs, without a word to the nodes: their seeds load
    them at once, and LoadShard wires them when they have (``finish_seeded_cluster``).
    """
    settings = settings or TaskSettings.from_env()
    ecs = client("ecs")
    command = node_command(engine, cluster_mode=True, creds=creds, tls=tls) + node_arguments
    shards = [ShardNodes(NodeTask(node_id(cache, i, 0), "", ""), [], format_slot_ranges([r]))
              for i, r in enumerate(even_split(num_shards))]  # fmt: skip
    arns: list[str] = []
    try:
        for shard in shards:
            node = shard.primary
            env = seed(node.node_id, str(shard.slots))
            node.task_arn = _run_node_task(ecs, settings, cache, node.node_id, engine, command,
                                           node_environment(tls), env)  # fmt: skip
            arns.append(node.task_arn)
        hosts = _wait_running(ecs, settings.cluster, arns)
    except BaseException:
        stop_tasks(arns, "cache nodes did not start", settings)
        raise
    for shard in shards:
        shard.primary.host = hosts[shard.primary.task_arn]
    return CacheNodes(cache, True, shards)


def finish_seeded_cluster(nodes: CacheNodes, creds: Credentials, timeout: float = READY_TIMEOUT_S) -> None:
    """Loaded primaries into one cluster: each announces its address and takes its planned slots
    (``start_seeded_cluster``), then they meet; settled (cluster_state:ok everywhere) on return."""
    primaries = [s.primary for s in nodes.shards]
    _wait_ping(primaries, creds)
    for node in primaries:
        _announce(node, creds, True)
    conns = [_client(n, creds) for n in primaries]
    try:
        with _quick_rejoin(conns):
            for conn, shard in zip(conns, nodes.shards, strict=True):
                for start, end in parse_slot_ranges(str(shard.slots)):
                    conn.execute_command("CLUSTER", "ADDSLOTSRANGE", start, end)
            for epoch, conn in enumerate(conns, start=1):
                conn.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
            _meet_primaries(conns, primaries)
            wire(nodes, creds, new_replicas={}, sync_timeout=timeout)  # waits for the view to converge
    finally:
        for conn in conns:
            conn.close()


QUICK_REJOIN_NODE_TIMEOUT_MS = 500  # Redis' CLUSTER_MIN_REJOIN_DELAY: lower gains nothing


@contextlib.contextmanager
def _quick_rejoin(conns: list[redis.Redis]) -> Any:
    """The nodes' ``cluster-node-timeout`` at 500 ms while they are wired, put back after.

    A node with no slots counts itself in a minority, and once it has slots Redis keeps it out
    of ``cluster_state:ok`` for its node timeout (clusterUpdateState's rejoin delay): 5 s here
    (node_command). Measured with 4 new primaries on loopback: ok after 4.97 s, 0.42 s this way.
    """
    saved: list[tuple[redis.Redis, str]] = []
    try:
        for conn in conns:
            value = conn.config_get("cluster-node-timeout")["cluster-node-timeout"]
            conn.config_set("cluster-node-timeout", QUICK_REJOIN_NODE_TIMEOUT_MS)
            saved.append((conn, value))
        yield
    finally:
        for conn, value in saved:
            with contextlib.suppress(redis.RedisError, OSError):  # a node gone: the caller's error says so
                conn.config_set("cluster-node-timeout", value)


def follow_seed(node: NodeTask, port: int, creds: Credentials) -> None:
    """The node takes its task's seed, listening at ``port`` of the task's address, as its master.

    In plaintext even for a TLS cache: the seed speaks none, and the link never leaves the task
    (the node reaches its own address); ``promote_seeded_shard`` turns TLS replication back on.
    """
    with _client(node, creds) as conn:
        if creds.tls is not None:
            conn.config_set("tls-replication", "no")
        conn.execute_command("REPLICAOF", node.host, port)


def seeded_node_busy(node: NodeTask, creds: Credentials) -> bool:
    """A sync or a load still under way on the node."""
    with _client(node, creds, timeout=5.0) as conn:
        syncing = int(conn.info("replication").get("master_sync_in_progress", 0))
        loading = int(conn.info("persistence").get("loading", 0))
    return bool(loading or syncing)


def promote_seeded_shard(shard: ShardNodes, creds: Credentials, timeout: float = READY_TIMEOUT_S) -> None:
    """The primary stops following its seed; the replicas follow the primary and resync partially
    (the same replication ID and offset: restore.seed); in sync on return."""
    with _client(shard.primary, creds) as conn:
        conn.execute_command("REPLICAOF", "NO", "ONE")
        if creds.tls is not None:
            conn.config_set("tls-replication", "yes")
    for replica in shard.replicas:
        with _client(replica, creds) as conn:
            if creds.tls is not None:
                conn.config_set("tls-replication", "yes")  # the primary listens on TLS only
            conn.execute_command("REPLICAOF", shard.primary.host, shard.primary.port)
    wait_in_sync(shard, creds, timeout)


def seeded_task_problems(nodes: list[NodeTask], settings: TaskSettings | None = None) -> list[str]:
    """What went wrong with seeded node tasks (DescribeTasks): a task that stopped, or a seed
    container that exited with an error (it is not essential: its task runs on without it)."""
    settings = settings or TaskSettings.from_env()
    by_arn = {n.task_arn: n for n in nodes}
    problems = []
    for task in client("ecs").describe_tasks(cluster=settings.cluster, tasks=list(by_arn))["tasks"]:
        node = by_arn.get(task["taskArn"])
        name = node.node_id if node else task["taskArn"]
        containers = task.get("containers", [])
        if task["lastStatus"] == "STOPPED":
            why = "; ".join(
                f"container {c.get('name')}: "
                + ("did not run" if c.get("exitCode") is None else f"exit code {c['exitCode']}")
                + (f" ({c['reason']})" if c.get("reason") else "")
                for c in containers
            )
            problems.append(f"the task of node {name} stopped: {task.get('stoppedReason', '')} ({why})")
            continue
        for c in containers:
            if c.get("name") == "seed" and c.get("lastStatus") == "STOPPED" and c.get("exitCode") not in (0, None):
                problems.append(f"the seed of node {name} exited with code {c['exitCode']}")
    return problems


def node_replid(node: NodeTask, creds: Credentials) -> str:
    """The replication ID the node followed last (INFO replication ``master_replid``)."""
    with _client(node, creds) as conn:
        return str(conn.info("replication").get("master_replid", ""))


def _wait_running(ecs: Any, cluster: str, arns: list[str]) -> dict[str, str]:
    """Task ARN -> its address, once every task runs."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    hosts: dict[str, str] = {}
    while True:
        for start in range(0, len(arns), 100):
            for task in ecs.describe_tasks(cluster=cluster, tasks=arns[start : start + 100])["tasks"]:
                if task["lastStatus"] == "STOPPED":
                    raise TargetNotReady(
                        f"cache node task {task['taskArn']} stopped: {task.get('stoppedReason', '')} "
                        f"(exit codes {[c.get('exitCode') for c in task.get('containers', [])]})"
                    )
                if task["lastStatus"] == "RUNNING" and (ip := task_ip(task)):
                    hosts[task["taskArn"]] = ip
        if len(hosts) == len(arns):
            return hosts
        if time.monotonic() > deadline:
            raise TargetNotReady(f"cache node tasks not RUNNING after {READY_TIMEOUT_S:.0f} s")
        time.sleep(_POLL_S)


def task_ip(task: dict[str, Any]) -> str | None:
    """The task's private IPv4, as Fargate reports it (ENI attachment, else the container's interface)."""
    for attachment in task.get("attachments", []):
        for detail in attachment.get("details", []):
            if detail.get("name") == "privateIPv4Address" and detail.get("value"):
                return str(detail["value"])
    for container in task.get("containers", []):
        for eni in container.get("networkInterfaces", []):
            if eni.get("privateIpv4Address"):
                return str(eni["privateIpv4Address"])
    return None


def _client(node: NodeTask | tuple[str, int], creds: Credentials, timeout: float = 10.0) -> redis.Redis:
    host, port = (node.host, node.port) if isinstance(node, NodeTask) else node
    return redis.Redis(
        host=host, port=port, socket_timeout=timeout, socket_connect_timeout=5, decode_responses=True,
        **creds.redis_kwargs(),
    )  # fmt: skip


def _answers(node: NodeTask, creds: Credentials) -> bool:
    with _client(node, creds, timeout=2.0) as conn:
        return bool(conn.ping()) and int(conn.info("persistence").get("loading", 0)) == 0


def _wait_ping(nodes: list[NodeTask], creds: Credentials) -> None:
    """Until every node answers PING with nothing loading: all nodes checked each round, not one after another."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    waiting = list(nodes)
    last: dict[str, Exception] = {}
    while waiting:  # bounded by the deadline
        for node in list(waiting):
            try:
                if _answers(node, creds):
                    waiting.remove(node)
            except (redis.RedisError, OSError) as exc:
                last[node.node_id] = exc
        if not waiting:
            return
        if time.monotonic() > deadline:
            node = waiting[0]
            raise TargetNotReady(
                f"node {node.node_id} at {node.host}:{node.port} did not answer: {last.get(node.node_id)}"
            )
        time.sleep(_NODE_POLL_S)


def _announce(node: NodeTask, creds: Credentials, cluster_mode: bool) -> None:
    """The node tells peers its task address: a connection's source address need not be it
    (on loopback every connection comes from 127.0.0.1; behind NAT from the NAT)."""
    with _client(node, creds) as conn:
        conn.config_set("replica-announce-ip", node.host)
        if cluster_mode:
            conn.config_set("cluster-announce-ip", node.host)


def stop_tasks(arns: list[str], reason: str, settings: TaskSettings | None = None) -> None:
    """StopTask each (a task already gone is fine: the cache is being torn down anyway)."""
    settings = settings or TaskSettings.from_env()
    ecs = client("ecs")
    for arn in arns:
        with contextlib.suppress(ecs.exceptions.ClientException, ecs.exceptions.InvalidParameterException):
            ecs.stop_task(cluster=settings.cluster, task=arn, reason=reason[:255])


def running_tasks_by_group(settings: TaskSettings | None = None) -> dict[str, list[str]]:
    """RunTask group -> ARNs of its tasks not stopped yet (``cachevault:<cache>`` nodes,
    ``capture:<snapshot>`` and ``load:<execution>`` workers); nothing when the cluster is gone."""
    settings = settings or TaskSettings.from_env()
    ecs = client("ecs")
    try:
        arns = ecs.list_tasks(cluster=settings.cluster, desiredStatus="RUNNING").get("taskArns", [])
    except ecs.exceptions.ClusterNotFoundException:
        return {}
    groups: dict[str, list[str]] = {}
    for start in range(0, len(arns), 100):  # DescribeTasks takes 100 at most
        for task in ecs.describe_tasks(cluster=settings.cluster, tasks=arns[start : start + 100])["tasks"]:
            if task.get("lastStatus") != "STOPPED":
                groups.setdefault(str(task.get("group") or ""), []).append(task["taskArn"])
    return groups


def node_task_group(cache: str) -> str:
    """The RunTask group of a cache's node tasks."""
    return f"cachevault:{cache}"


def node_id(cache: str, shard: int, member: int) -> str:
    return f"{cache}-{shard + 1:04d}-{member + 1:03d}"


# ---------------------------------------------------------------------------------- wiring
def wire(
    nodes: CacheNodes,
    creds: Credentials,
    new_replicas: dict[int, list[NodeTask]] | None = None,
    sync_timeout: float = READY_TIMEOUT_S,
    *,
    settle: bool = True,
) -> None:
    """Replication (REPLICAOF) or the cluster (slots, epochs, MEET, REPLICATE); wait until settled.

    ``new_replicas`` (shard index -> nodes) joins only those to an already wired cache.
    ``settle=False`` (a new cluster without replicas) returns once slots are assigned and
    MEETs sent, without waiting for the cluster view to converge: the caller must
    ``wait_cluster_ok`` before writing (restore's LoadShard does, so the wait overlaps its start).
    """
    joining = new_replicas if new_replicas is not None else {i: s.replicas for i, s in enumerate(nodes.shards)}
    if nodes.cluster_mode:
        _wire_cluster(nodes, creds, joining, fresh=new_replicas is None, settle=settle)
    else:
        primary = nodes.shards[0].primary
        for replica in joining.get(0, []):
            with _client(replica, creds) as conn:
                conn.execute_command("REPLICAOF", primary.host, primary.port)
    for index in joining:
        wait_in_sync(nodes.shards[index], creds, sync_timeout)


def _wire_cluster(
    nodes: CacheNodes, creds: Credentials, joining: dict[int, list[NodeTask]], fresh: bool, settle: bool = True
) -> None:
    everyone = [n for s in nodes.shards for n in (s.primary, *s.replicas)]
    conns = {n.node_id: _client(n, creds) for n in everyone}
    try:
        ids = {n.node_id: conns[n.node_id].execute_command("CLUSTER", "MYID") for n in everyone}
        first = conns[nodes.shards[0].primary.node_id]
        if fresh:
            ranges = even_split(len(nodes.shards))
            for shard, (start, end) in zip(nodes.shards, ranges, strict=True):
                conns[shard.primary.node_id].execute_command("CLUSTER", "ADDSLOTSRANGE", start, end)
                shard.slots = format_slot_ranges([(start, end)])
            for epoch, node in enumerate(everyone, start=1):
                conns[node.node_id].execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
            _meet_primaries([conns[s.primary.node_id] for s in nodes.shards], [s.primary for s in nodes.shards])
        for index, replicas in joining.items():
            primary = nodes.shards[index].primary
            for replica in replicas:
                conn = conns[replica.node_id]
                conn.execute_command("CLUSTER", "MEET", primary.host, primary.port)
                _until(lambda c=conn, p=ids[primary.node_id]: _replicate(c, p), f"{replica.node_id} to replicate")
                first.execute_command("CLUSTER", "MEET", replica.host, replica.port)
        if not settle and not any(joining.values()):
            return
        expected = {ids[s.primary.node_id]: "-" for s in nodes.shards}
        expected |= {ids[r.node_id]: ids[s.primary.node_id] for s in nodes.shards for r in s.replicas}
        with _quick_rejoin(list(conns.values()) if fresh else []):
            for node in everyone:
                _until(lambda c=conns[node.node_id]: _converged(c, expected), f"cluster view of {node.node_id}")
    finally:
        for conn in conns.values():
            conn.close()


def _meet_primaries(conns: list[redis.Redis], primaries: list[NodeTask]) -> None:
    """Every primary MEETs every other (up to MESH_MEET_MAX nodes; beyond, the first MEETs the rest).

    With MEETs from the first node only, the others learn of each other by gossip and the
    last node's cluster_state:ok came 2.9-4.9 s after wiring in 2 of 3 runs (3 nodes, loopback);
    meeting directly, all 3 were ok at 2.0 s every time (Redis' CLUSTER_WRITABLE_DELAY).
    """
    pairs = (
        [(i, j) for i in range(len(primaries)) for j in range(i + 1, len(primaries))]
        if len(primaries) <= MESH_MEET_MAX
        else [(0, j) for j in range(1, len(primaries))]
    )
    for i, j in pairs:
        try:
            conns[i].execute_command("CLUSTER", "MEET", primaries[j].host, primaries[j].port)
        except redis.ResponseError:  # gossip started that handshake already (the MEET is refused then)
            if i == 0:
                raise


def _replicate(conn: redis.Redis, primary_id: str) -> bool:
    try:
        return bool(conn.execute_command("CLUSTER", "REPLICATE", primary_id))
    except redis.ResponseError:  # the primary is not known yet (handshake in progress)
        return False


def _converged(conn: redis.Redis, expected: dict[str, str]) -> bool:
    if "cluster_state:ok" not in str(conn.execute_command("CLUSTER", "INFO")):
        return False
    roles = {}
    for line in str(conn.execute_command("CLUSTER", "NODES")).splitlines():
        parts = line.split()
        if len(parts) >= 4 and "handshake" not in parts[2] and "noaddr" not in parts[2]:
            roles[parts[0]] = parts[3]
    return roles == expected


def _until(predicate: Any, what: str, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TargetNotReady(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(_NODE_POLL_S)


def wait_cluster_ok(
    endpoints: list[tuple[str, int]], creds: Credentials, timeout: float = READY_TIMEOUT_S, *, ours: bool = False
) -> None:
    """Until every node reports ``cluster_state:ok`` (every slot served, as that node sees it).

    A new cluster's primaries get there about 2 s after they start (Redis keeps a restarted
    primary out of the OK state for CLUSTER_WRITABLE_DELAY), or their node timeout after they
    got their slots (``_quick_rejoin`` shortens that while waiting, on nodes cachevault started:
    ``ours``; a user's own cluster keeps its settings); RESTORE before then fails with CLUSTERDOWN.
    """
    waiting = list(endpoints)

    def settled() -> bool:
        for endpoint in list(waiting):
            with _client(endpoint, creds) as conn:
                if "cluster_state:ok" in str(conn.execute_command("CLUSTER", "INFO")):
                    waiting.remove(endpoint)
        return not waiting

    conns = [_client(endpoint, creds) for endpoint in endpoints] if ours else []
    try:
        with _quick_rejoin(conns):
            _until(settled, "cluster_state:ok on " + ", ".join(f"{h}:{p}" for h, p in endpoints), timeout)
    finally:
        for conn in conns:
            conn.close()


def replica_lag(shard: ShardNodes | topology.Shard, creds: Credentials) -> dict[str, int | None]:
    """Each replica's bytes behind its primary (0: in sync); None while its link is down."""
    with _client((shard.primary.host, shard.primary.port), creds) as conn:
        offset = int(conn.info("replication").get("master_repl_offset", 0))
    lag: dict[str, int | None] = {}
    for replica in shard.replicas:
        name = getattr(replica, "node_id", None) or f"{replica.host}:{replica.port}"
        try:
            with _client((replica.host, replica.port), creds) as conn:
                info = conn.info("replication")
        except (redis.RedisError, OSError):
            lag[name] = None
            continue
        linked = info.get("master_link_status") == "up"
        lag[name] = offset - int(info.get("slave_repl_offset", 0)) if linked else None
    return lag


def lagging_replicas(shard: ShardNodes | topology.Shard, creds: Credentials) -> list[str]:
    """Replicas whose link is down or whose offset differs from their primary's."""
    return [name for name, lag in replica_lag(shard, creds).items() if lag != 0]


def wait_in_sync(shard: ShardNodes, creds: Credentials, timeout: float) -> None:
    if shard.replicas:
        _until(lambda: not lagging_replicas(shard, creds), f"the replicas of {shard.primary.node_id} to sync", timeout)


# ---------------------------------------------------------------------------------- records
def nodes_from_record(cache: dict[str, Any]) -> CacheNodes:
    """The cache's nodes (with their task ARNs) from its registry record."""
    shards: dict[str, ShardNodes] = {}
    for n in cache.get("Nodes", []):
        host, _, port = n["Address"].rpartition(":")
        node = NodeTask(n["CacheNodeId"], n.get("TaskArn", ""), host, int(port), n["Role"])
        group = n["NodeGroupId"]
        if n["Role"] == "primary":
            existing = shards.get(group)
            shards[group] = ShardNodes(node, existing.replicas if existing else [], (n.get("Slots")))
        else:
            shards.setdefault(group, ShardNodes(node)).replicas.append(node)
    ordered = [shards[g] for g in sorted(shards)]
    return CacheNodes(cache["CacheName"], bool(cache.get("ClusterMode")), ordered)


def node_entries(nodes: CacheNodes) -> list[dict[str, Any]]:
    entries = []
    for index, shard in enumerate(nodes.shards, start=1):
        for node in (shard.primary, *shard.replicas):
            entries.append(
                {
                    "CacheNodeId": node.node_id,
                    "Address": f"{node.host}:{node.port}",
                    "NodeGroupId": f"{index:04d}",
                    "Role": "primary" if node is shard.primary else "replica",
                    "TaskArn": node.task_arn,
                    "Slots": shard.slots,
                }
            )
    return entries


def ecs_record(nodes: CacheNodes, creds: Credentials, *, node_type: str, data_tiering: bool) -> dict[str, Any]:
    """Registry fields of an ECS cache (``Managed: ecs``), engine read from a primary."""
    primary = nodes.shards[0].primary
    engine, version, rdb_version = topology.engine_info(primary.host, primary.port, credentials=creds)
    return {
        "CacheName": nodes.name,
        "Engine": engine,
        "EngineVersion": version,
        "MaxRdbVersion": rdb_version,
        "ClusterMode": nodes.cluster_mode,
        "CacheNodeType": node_type,
        "DataTiering": "enabled" if data_tiering else "disabled",
        "Kind": "node-based",
        "Managed": "ecs",
        "NumNodeGroups": len(nodes.shards),
        "ReplicasPerNodeGroup": len(nodes.shards[0].replicas),
        "Endpoints": [f"{s.primary.host}:{s.primary.port}" for s in nodes.shards],
        "Nodes": node_entries(nodes),
    }


def task_arns(cache: dict[str, Any]) -> list[str]:
    return [n["TaskArn"] for n in cache.get("Nodes", []) if n.get("TaskArn")]


# ---------------------------------------------------------------------------------- create / destroy
def create_ecs_cache(
    name: str,
    *,
    engine: str,
    cluster_mode: bool,
    num_shards: int,
    replicas: int,
    creds: Credentials,
    tls: dict[str, str] | None,
    settle: bool = True,
) -> CacheNodes:
    """Start ``num_shards`` primaries (and ``replicas`` each) as tasks and wire them; all or nothing.

    ``settle``: see ``wire``.
    """
    plan = [(shard, member) for shard in range(num_shards) for member in range(1 + replicas)]
    started = start_node_tasks(
        name, [node_id(name, s, m) for s, m in plan], engine=engine, cluster_mode=cluster_mode, creds=creds, tls=tls
    )
    try:
        shards = []
        for shard in range(num_shards):
            members = [n for (s, _), n in zip(plan, started, strict=True) if s == shard]
            for member in members[1:]:
                member.role = "replica"
            shards.append(ShardNodes(members[0], members[1:]))
        nodes = CacheNodes(name, cluster_mode, shards)
        wire(nodes, creds, settle=settle)
        return nodes
    except BaseException:
        stop_tasks([n.task_arn for n in started], "cache creation failed")
        raise


def add_ecs_replicas(cache: dict[str, Any], replicas: int, creds: Credentials, tls: dict[str, str] | None,
                     timeout: float) -> CacheNodes:  # fmt: skip
    """Give every shard ``replicas`` replicas (tasks), wired to its primary; in sync on return."""
    nodes = nodes_from_record(cache)
    plan = [
        (index, member)
        for index, shard in enumerate(nodes.shards)
        for member in range(1 + len(shard.replicas), 1 + replicas)
    ]
    if not plan:
        return nodes
    name = nodes.name
    started = start_node_tasks(
        name,
        [node_id(name, s, m) for s, m in plan],
        engine=str(cache.get("Engine") or "redis"),
        cluster_mode=nodes.cluster_mode,
        creds=creds,
        tls=tls,
    )
    try:
        joining: dict[int, list[NodeTask]] = {}
        for (index, _), node in zip(plan, started, strict=True):
            node.role = "replica"
            joining.setdefault(index, []).append(node)
            nodes.shards[index].replicas.append(node)
        wire(nodes, creds, new_replicas=joining, sync_timeout=timeout)  # in sync on return
        return nodes
    except BaseException:
        stop_tasks([n.task_arn for n in started], "replicas did not sync")
        raise


def destroy(cache: dict[str, Any], reason: str) -> None:
    """Stop an ECS cache's tasks; an external cache's nodes are the user's and stay as they are."""
    if cache.get("Managed") == "ecs":
        stop_tasks(task_arns(cache), reason)


# ---------------------------------------------------------------------------------- external
def check_external_empty(cache: dict[str, Any]) -> topology.Topology:
    """The registered external cache's live layout; refused unless reachable and empty everywhere."""
    name = cache["CacheName"]
    creds = creds_mod.for_cache(cache)
    try:
        topo = topology.discover(topology.seed_endpoints(cache), credentials=creds)
    except Exception as exc:
        raise TargetNotEmpty(f"Restore target {name!r} cannot be reached: {exc}") from exc
    for shard in topo.shards:
        if not shard.primary.link_up:
            raise TargetNotEmpty(f"Restore target {name!r}: primary {shard.primary.endpoint} is not reachable.")
        try:
            with _client((shard.primary.host, shard.primary.port), creds) as conn:
                keys = int(conn.dbsize())
                per_db = conn.info("keyspace")
        except (redis.RedisError, OSError) as exc:
            raise TargetNotEmpty(f"Restore target {name!r}: {shard.primary.endpoint} cannot be read: {exc}") from exc
        if keys or per_db:
            held = ", ".join(f"{db}={info.get('keys')}" for db, info in per_db.items()) or f"db0={keys}"
            raise TargetNotEmpty(
                f"Restore target {name!r} is not empty: primary {shard.primary.endpoint} holds keys ({held}). "
                "A restore only goes into an empty cache (DBSIZE 0 on every primary); flush it or pick another."
            )
    return topo


def check_external_available(cache: dict[str, Any]) -> None:
    if cache.get("Status") not in ("available",):
        raise InvalidReplicationGroupState(
            f"Replication group {cache['CacheName']!r} is {cache.get('Status')!r}; a restore needs it available."
        )
