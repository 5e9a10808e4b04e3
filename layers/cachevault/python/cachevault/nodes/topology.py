"""Discover a cache's shape (shards, slots, primaries, replicas, their health) from any node.

Works on any reachable Redis OSS / Valkey, not only the local fleet. Cluster mode: the
layout comes from ``CLUSTER SHARDS`` (7.0+, else ``CLUSTER NODES``); health and lag come
from asking every node for ``INFO replication`` itself, because the cluster view lags
behind reality by up to ``cluster-node-timeout``. Cluster mode disabled: follow a
replica's ``master_host`` to the primary and list its ``slaveN`` lines.

Topology must be re-read before every capture: a failover can move the primary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cachevault.core.errors import InvalidParameterValue, InvalidReplicationGroupState
from cachevault.nodes.credentials import Credentials, Tls, merge

PRIMARY = "primary"
REPLICA = "replica"


@dataclass
class Node:
    host: str
    port: int
    role: str  # "primary" | "replica"
    link_up: bool  # primary: reachable and a master; replica: master_link_status:up
    lag_bytes: int | None  # primary's master_repl_offset - replica's slave_repl_offset
    node_id: str | None = None  # cluster node id (40 hex); None when cluster mode is off
    run_id: str | None = None
    repl_offset: int | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def matches(self, name: str) -> bool:
        return name in (self.endpoint, self.node_id, self.run_id)


@dataclass
class Shard:
    shard_id: str  # "0001", "0002" ... in slot order, ElastiCache style
    slots: list[tuple[int, int]]
    primary: Node
    replicas: list[Node] = field(default_factory=list)

    @property
    def nodes(self) -> list[Node]:
        return [self.primary, *self.replicas]

    def slot_count(self) -> int:
        return sum(end - start + 1 for start, end in self.slots)


@dataclass
class Topology:
    cluster_mode: bool
    shards: list[Shard]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (Step Functions passes it between states)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Topology:
        shards = [
            Shard(
                shard_id=s["shard_id"],
                slots=[(int(a), int(b)) for a, b in s["slots"]],
                primary=Node(**s["primary"]),
                replicas=[Node(**r) for r in s["replicas"]],
            )
            for s in data["shards"]
        ]
        return cls(cluster_mode=bool(data["cluster_mode"]), shards=shards)


@dataclass(frozen=True)
class _Auth:
    password: str | None = field(repr=False)
    username: str | None
    timeout: float
    tls: Tls | None = None

    @property
    def creds(self) -> Credentials:
        return Credentials(self.username, self.password, self.tls)


def _auth(password: str | None, username: str | None, timeout: float, credentials: Credentials | None) -> _Auth:
    creds = merge(credentials, username, password)
    return _Auth(creds.password, creds.username, timeout, creds.tls)


@contextlib.contextmanager
def _connect(host: str, port: int, auth: _Auth) -> Iterator[redis.Redis]:
    client = redis.Redis(
        host=host,
        port=port,
        **auth.creds.redis_kwargs(),  # AUTH user/password and TLS (certificate checked)
        socket_timeout=auth.timeout,
        socket_connect_timeout=auth.timeout,
        retry=Retry(NoBackoff(), 0),  # a dead node must cost one timeout, not a backoff series
        decode_responses=True,
    )
    try:
        yield client
    finally:
        client.close()


def _node_info(host: str, port: int, section: str, auth: _Auth) -> dict[str, Any]:
    """INFO <section> of one node; redis errors propagate."""
    with _connect(host, port, auth) as client:
        return dict(client.info(section))


def _info(host: str, port: int, auth: _Auth, section: str) -> dict[str, Any] | None:
    """INFO <section>, or None if the node is unreachable (down, NOAUTH, LOADING ...)."""
    try:
        return _node_info(host, port, section, auth)
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError):
        return None


def discover(
    seed_endpoints: list[tuple[str, int]],
    *,
    password: str | None = None,
    username: str | None = None,
    timeout: float = 5.0,
    credentials: Credentials | None = None,
) -> Topology:
    """The topology seen from the first reachable seed."""
    if not seed_endpoints:
        raise InvalidParameterValue("at least one seed endpoint is required")
    auth = _auth(password, username, timeout, credentials)
    errors: list[str] = []
    for host, port in seed_endpoints:
        try:
            with _connect(host, port, auth) as client:
                cluster_enabled = client.info("cluster").get("cluster_enabled") == 1
                if cluster_enabled:
                    return Topology(True, _discover_cluster(client, auth))
                return Topology(False, [_discover_replication(host, port, client.info("replication"), auth)])
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError) as exc:
            errors.append(f"{host}:{port}: {exc}")
    raise InvalidReplicationGroupState(
        "no seed endpoint answered: " + "; ".join(errors),
        endpoints=[f"{h}:{p}" for h, p in seed_endpoints],
    )


# ----- cluster mode disabled -----------------------------------------------------------


def _replica_lines(info: Mapping[str, Any]) -> list[tuple[str, int, str, int | None]]:
    """(ip, port, state, offset) of each ``slaveN`` line of a primary's INFO replication."""
    out = []
    for index in range(len(info)):
        line = info.get(f"slave{index}")
        if not isinstance(line, dict):
            break
        offset = line.get("offset")
        out.append((str(line["ip"]), int(line["port"]), str(line.get("state", "")), offset))
    return out


def _replica_node(host: str, port: int, primary_offset: int | None, auth: _Auth, node_id: str | None = None) -> Node:
    info = _info(host, port, auth, "replication")
    server = _info(host, port, auth, "server") if info is not None else None
    if info is None or info.get("role") != "slave":
        return Node(host, port, REPLICA, False, None, node_id, server and server.get("run_id"))
    # master_link_status:down is the state in which data commands answer -NOMASTERLINK.
    link_up = info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")
    offset = info.get("slave_repl_offset")
    lag = max(0, primary_offset - offset) if primary_offset is not None and offset is not None else None
    return Node(host, port, REPLICA, link_up, lag, node_id, server and server.get("run_id"), offset)


def _discover_replication(host: str, port: int, seed_info: Mapping[str, Any], auth: _Auth) -> Shard:
    if seed_info.get("role") == "slave":
        primary_host, primary_port = str(seed_info["master_host"]), int(seed_info["master_port"])
    else:
        primary_host, primary_port = host, port
    primary_info = _info(primary_host, primary_port, auth, "replication")
    replicas: list[Node] = []
    if primary_info is None or primary_info.get("role") != "master":
        # Primary unreachable: all we know is the seed replica (its link is down).
        primary = Node(primary_host, primary_port, PRIMARY, False, None)
        if (host, port) != (primary_host, primary_port):
            replicas.append(_replica_node(host, port, None, auth))
        return Shard("0001", [], primary, replicas)
    server = _info(primary_host, primary_port, auth, "server") or {}
    # Replicas first, then the primary's offset: lag can only be over-estimated.
    listed = _replica_lines(primary_info)
    replica_nodes = [_replica_node(ip, rport, None, auth) for ip, rport, _, _ in listed]
    primary_info = _info(primary_host, primary_port, auth, "replication") or primary_info
    primary_offset = primary_info.get("master_repl_offset")
    for node, (_, _, state, line_offset) in zip(replica_nodes, listed, strict=True):
        offset = node.repl_offset if node.repl_offset is not None else line_offset
        if offset is not None and primary_offset is not None:
            node.lag_bytes = max(0, primary_offset - offset)
        node.link_up = node.link_up and state == "online"
        replicas.append(node)
    seed_listed = any((r.host, r.port) == (host, port) for r in replicas)
    if (host, port) != (primary_host, primary_port) and not seed_listed:
        replicas.append(_replica_node(host, port, primary_offset, auth))
    primary = Node(primary_host, primary_port, PRIMARY, True, 0, None, server.get("run_id"), primary_offset)
    return Shard("0001", [], primary, replicas)


# ----- cluster mode enabled ------------------------------------------------------------


@dataclass
class _RawNode:
    host: str
    port: int
    node_id: str
    primary: bool
    healthy: bool
    offset: int | None


@dataclass
class _RawShard:
    slots: list[tuple[int, int]]
    primary: _RawNode | None
    replicas: list[_RawNode]


def _pairs(flat: list[Any]) -> list[tuple[int, int]]:
    return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat) - 1, 2)]


def _shards_from_cluster_shards(reply: list[Any], seed_host: str) -> list[_RawShard]:
    shards = []
    for entry in reply:
        item = entry if isinstance(entry, dict) else dict(zip(entry[::2], entry[1::2], strict=True))
        primary: _RawNode | None = None
        replicas: list[_RawNode] = []
        for raw in item.get("nodes", []):
            n = raw if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2], strict=True))
            # An empty ip means "the address you reached me on" (single-host clusters).
            host = n.get("ip") or n.get("endpoint") or seed_host
            if host == "?":
                host = seed_host
            node = _RawNode(
                host=str(host),
                port=int(n.get("port") or n.get("tls-port")),
                node_id=str(n["id"]),
                primary=n.get("role") == "master",
                # Redis 7.0 reports a replica at offset 0 as "loading" even when linked;
                # only "failed" is trusted here, INFO replication decides the rest.
                healthy=n.get("health") != "failed",
                offset=n.get("replication-offset"),
            )
            if node.primary and primary is None:
                primary = node
            else:
                replicas.append(node)
        shards.append(_RawShard(_pairs(item.get("slots", [])), primary, replicas))
    return shards


def _shards_from_cluster_nodes(text: str, seed_host: str) -> list[_RawShard]:
    """CLUSTER NODES: ``<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot>...``."""
    primaries: dict[str, _RawShard] = {}
    replicas: list[tuple[str, _RawNode]] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        flags = parts[2].split(",")
        if "handshake" in flags or "noaddr" in flags:
            continue
        addr = parts[1].split("@")[0]
        host, _, port = addr.rpartition(":")
        node = _RawNode(
            host=host or seed_host,
            port=int(port),
            node_id=parts[0],
            primary="master" in flags,
            healthy=not ({"fail", "fail?"} & set(flags)) and parts[7] == "connected",
            offset=None,
        )
        if node.primary:
            slots: list[tuple[int, int]] = []
            for item in parts[8:]:
                if item.startswith("["):
                    continue
                start, _, end = item.partition("-")
                slots.append((int(start), int(end or start)))
            primaries[node.node_id] = _RawShard(slots, node, [])
        else:
            replicas.append((parts[3], node))
    for master_id, node in replicas:
        if master_id in primaries:
            primaries[master_id].replicas.append(node)
    return list(primaries.values())


def _discover_cluster(client: redis.Redis, auth: _Auth) -> list[Shard]:
    seed_host = str(client.connection_pool.connection_kwargs.get("host", "127.0.0.1"))
    try:
        raw = _shards_from_cluster_shards(client.execute_command("CLUSTER", "SHARDS"), seed_host)
    except redis.ResponseError:
        # Before 7.0 there is no CLUSTER SHARDS; CLUSTER NODES carries the same facts.
        raw = _shards_from_cluster_nodes(str(client.execute_command("CLUSTER", "NODES")), seed_host)
    return _health_check(raw, auth)


def _regroup_stale_primaries(raw: list[_RawShard], auth: _Auth) -> list[_RawShard]:
    """A slotless "primary" may be a replica the seed's gossip view has not caught up with."""
    by_endpoint = {(s.primary.host, s.primary.port): s for s in raw if s.primary is not None and s.slots}
    kept: list[_RawShard] = []
    for shard in raw:
        primary = shard.primary
        if primary is not None and not shard.slots:
            info = _info(primary.host, primary.port, auth, "replication")
            if info is not None and info.get("role") == "slave":
                owner = by_endpoint.get((str(info.get("master_host")), int(info.get("master_port", 0))))
                if owner is not None:
                    primary.primary = False
                    owner.replicas.append(primary)
                    continue
        kept.append(shard)
    return kept


def _health_check(raw: list[_RawShard], auth: _Auth) -> list[Shard]:
    raw = _regroup_stale_primaries(raw, auth)
    shards: list[Shard] = []
    # Slotless primaries (a node just added, not yet resharded) sort last.
    ordered = sorted(
        (s for s in raw if s.primary is not None),
        key=lambda s: (not s.slots, s.slots[0][0] if s.slots else 0),
    )
    for index, rs in enumerate(ordered, start=1):
        assert rs.primary is not None
        replica_nodes = [_replica_node(r.host, r.port, None, auth, r.node_id) for r in rs.replicas]
        for node, r in zip(replica_nodes, rs.replicas, strict=True):
            node.link_up = node.link_up and r.healthy
        pinfo = _info(rs.primary.host, rs.primary.port, auth, "replication")
        pserver = _info(rs.primary.host, rs.primary.port, auth, "server") if pinfo else None
        primary_up = pinfo is not None and pinfo.get("role") == "master" and rs.primary.healthy
        primary_offset = pinfo.get("master_repl_offset") if pinfo else rs.primary.offset
        for node in replica_nodes:
            if node.repl_offset is not None and primary_offset is not None:
                node.lag_bytes = max(0, primary_offset - node.repl_offset)
        primary = Node(
            rs.primary.host,
            rs.primary.port,
            PRIMARY,
            primary_up,
            0 if primary_up else None,
            rs.primary.node_id,
            pserver.get("run_id") if pserver else None,
            primary_offset,
        )
        shards.append(Shard(f"{index:04d}", sorted(rs.slots), primary, replica_nodes))
    return shards


# ----- choosing a capture source -------------------------------------------------------


def choose_source(
    shard: Shard,
    prefer_node: str | None = None,
    *,
    allow_primary: bool = False,
    exhausted: Callable[[Node], bool] | None = None,
) -> Node:
    """The node to capture from: a healthy replica with the smallest lag.

    ``prefer_node`` (``host:port``, cluster node id or run id) names the node explicitly;
    naming the primary is an explicit choice and allowed. ``exhausted(node)`` tells a
    replica that has used its snapshot quota: the next healthy replica is taken instead
    (if every healthy one has, the healthiest is returned and the quota rule refuses it).
    Without a healthy replica the primary is used only with ``allow_primary`` (its fork
    costs the writers latency).
    """
    if prefer_node:
        for node in shard.nodes:
            if node.matches(prefer_node):
                if not node.link_up:
                    raise InvalidReplicationGroupState(
                        f"node {prefer_node} of shard {shard.shard_id} is not healthy "
                        f"({node.role}, link down or unreachable)",
                        node=prefer_node,
                    )
                return node
        raise InvalidParameterValue(
            f"node {prefer_node} is not part of shard {shard.shard_id}",
            node=prefer_node,
            shard_id=shard.shard_id,
        )
    healthy = sorted(
        (r for r in shard.replicas if r.link_up), key=lambda r: r.lag_bytes if r.lag_bytes is not None else 1 << 62
    )
    if healthy:
        with_quota = [r for r in healthy if exhausted is None or not exhausted(r)]
        return (with_quota or healthy)[0]
    if allow_primary and shard.primary.link_up:
        return shard.primary
    # Name the replicas and why: a replica without its master link refuses SYNC with
    # -NOMASTERLINK, so the operator learns what a capture would have hit.
    unlinked = [r.endpoint for r in shard.replicas]
    raise InvalidReplicationGroupState(
        f"shard {shard.shard_id} has no healthy replica"
        + (f" (master link down or unreachable, -NOMASTERLINK: {', '.join(unlinked)})" if unlinked else "")
        + ("" if allow_primary else " (capturing from the primary was not allowed)")
        + ("" if shard.primary.link_up else f" and its primary is down ({shard.primary.endpoint})"),
        shard_id=shard.shard_id,
    )


# ----- engine and memory ---------------------------------------------------------------


def _version_tuple(version: str) -> tuple[int, int]:
    parts = [*version.split("."), "0", "0"][:2]
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise InvalidParameterValue(f"unparseable engine version {version!r}") from None


def rdb_version_for(engine: str, version: str) -> int:
    """Highest RDB version the engine writes and accepts."""
    major_minor = _version_tuple(version)
    if engine == "valkey":
        return 11  # Valkey 7.2 / 8.x keep Redis 7.2's RDB v11
    if major_minor >= (7, 4):
        return 12
    if major_minor >= (7, 2):
        return 11
    if major_minor >= (7, 0):
        return 10
    if major_minor >= (5, 0):
        return 9
    if major_minor >= (4, 0):
        return 8
    return 7


def engine_from_info(info: Mapping[str, Any]) -> tuple[str, str]:
    """(engine, version) from INFO server: Valkey says ``valkey_version`` beside a frozen redis one."""
    if "valkey_version" in info or str(info.get("server_name", "")).lower() == "valkey":
        return "valkey", str(info.get("valkey_version", info.get("redis_version", "")))
    return "redis", str(info.get("redis_version", ""))


def engine_info(
    host: str,
    port: int,
    *,
    password: str | None = None,
    username: str | None = None,
    timeout: float = 5.0,
    credentials: Credentials | None = None,
) -> tuple[str, str, int]:
    """(engine, version, max RDB version the node accepts)."""
    info = _node_info(host, port, "server", _auth(password, username, timeout, credentials))
    engine, version = engine_from_info(info)
    return engine, version, rdb_version_for(engine, version)


def node_memory(
    host: str,
    port: int,
    *,
    password: str | None = None,
    username: str | None = None,
    timeout: float = 5.0,
    credentials: Credentials | None = None,
) -> dict[str, Any]:
    """used_memory, maxmemory (0 = unlimited), total_system_memory, in bytes, and the policy."""
    info = _node_info(host, port, "memory", _auth(password, username, timeout, credentials))
    return {
        "used_memory": int(info["used_memory"]),
        "used_memory_dataset": int(info.get("used_memory_dataset", 0)),
        "maxmemory": int(info.get("maxmemory", 0)),
        "total_system_memory": int(info.get("total_system_memory", 0)),
        "maxmemory_policy": str(info.get("maxmemory_policy", "")),
    }


def parse_endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidParameterValue(f"Endpoint {text!r} must be host:port.")
    return host, int(port)


def seed_endpoints(cache: dict[str, Any]) -> list[tuple[str, int]]:
    """The endpoints, then every known node: with the primary down (or failed over), the
    topology is still read from a replica, which tells whether its master link is up."""
    seeds: list[tuple[str, int]] = []
    for address in [*cache.get("Endpoints", []), *(n.get("Address", "") for n in cache.get("Nodes", []))]:
        if address and (seed := parse_endpoint(address)) not in seeds:
            seeds.append(seed)
    return seeds
