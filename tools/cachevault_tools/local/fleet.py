"""The local Redis fleet: ElastiCache-shaped caches made of real ``redis-server`` processes.

Layout on disk (one JSON per cache so any process can find, use and stop it)::

    <state_dir>/caches/<name>/cache.json
    <state_dir>/caches/<name>/<name>-0001-001/   primary of shard 0001 (redis.conf, pid, log)
    <state_dir>/caches/<name>/<name>-0001-002/   its first replica ...

A cache is either owned (its creator's PID and start time are recorded; when that
process is gone, ``reap_stale`` stops the nodes) or detached (lives until destroyed,
as the CLI wants). A cache whose creation never finished is always reaped once its
creator is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from cachevault.core.errors import (
    InvalidParameterCombination,
    InvalidParameterValue,
    ReplicationGroupAlreadyExistsFault,
    ReplicationGroupNotFoundFault,
)
from cachevault.nodes.slots import compress_slots, even_split
from cachevault.nodes.topology import engine_from_info

from cachevault_tools.local.redis_process import (
    RedisNodeError,
    RedisProcess,
    is_our_redis,
    node_client,
    node_from_dir,
    own_start_time,
    process_alive,
    start_node,
)

LAYOUT_FILE = "cache.json"
# ElastiCache replication group id: letter first, letters/digits/hyphens, no double or
# trailing hyphen, at most 40 characters.
_NAME_RE = re.compile(r"^[a-z](?:[a-z0-9]|-(?!-)){0,39}$")
_MAX_SHARDS = 500
_MAX_REPLICAS = 5


@dataclass
class NodeAddr:
    node_id: str
    host: str
    port: int
    pid: int
    data_dir: str

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass
class ShardLayout:
    shard_id: str
    slots: str | None
    primary: NodeAddr
    replicas: list[NodeAddr] = field(default_factory=list)

    @property
    def nodes(self) -> list[NodeAddr]:
        return [self.primary, *self.replicas]

    def slot_range(self) -> tuple[int, int] | None:
        if self.slots is None:
            return None
        start, _, end = self.slots.partition("-")
        return (int(start), int(end))


@dataclass
class CacheLayout:
    name: str
    cluster_mode: bool
    shards: list[ShardLayout]
    engine: str = "redis"
    engine_version: str = ""
    password: str | None = None
    tls: dict[str, str] | None = None  # cert_file, key_file, ca_file: TLS-only nodes
    status: str = "available"
    detached: bool = False
    owner_pid: int | None = None
    owner_start_time: int | None = None

    @property
    def nodes(self) -> list[NodeAddr]:
        return [node for shard in self.shards for node in shard.nodes]

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [node.endpoint for node in self.nodes]

    def node(self, node_id: str) -> NodeAddr:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise InvalidParameterValue(f"cache {self.name} has no node {node_id}", node_id=node_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CacheLayout:
        shards = [
            ShardLayout(
                shard_id=s["shard_id"],
                slots=s["slots"],
                primary=NodeAddr(**s["primary"]),
                replicas=[NodeAddr(**r) for r in s["replicas"]],
            )
            for s in data["shards"]
        ]
        rest = {k: v for k, v in data.items() if k != "shards"}
        return cls(shards=shards, **rest)


def slot_ranges(num_shards: int) -> list[tuple[int, int]]:
    """Even split as ElastiCache / redis-cli do it: 3 shards -> 0-5460, 5461-10922, 10923-16383."""
    return even_split(num_shards)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` until true; RedisNodeError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            if predicate():
                return
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            suffix = f" (last error: {last_exc})" if last_exc else ""
            raise RedisNodeError(f"timed out after {timeout:.0f}s waiting for {what}{suffix}")
        time.sleep(interval)


class Fleet:
    """Creates, finds and stops local caches under ``state_dir/caches``."""

    def __init__(self, state_dir: Path, *, reap: bool = False, ready_timeout: float = 60.0) -> None:
        self.state_dir = Path(state_dir)
        self.caches_dir = self.state_dir / "caches"
        self.caches_dir.mkdir(parents=True, exist_ok=True)
        self.ready_timeout = ready_timeout
        if reap:
            self.reap_stale()

    # ----- create -------------------------------------------------------------------

    def create_cache(
        self,
        name: str,
        *,
        cluster_mode: bool,
        num_shards: int = 1,
        replicas_per_shard: int = 1,
        config: Mapping[str, Any] | None = None,
        seed_rdbs: list[Path] | None = None,
        password: str | None = None,
        detached: bool = False,
        tls: Mapping[str, str] | None = None,
        username: str | None = None,
    ) -> CacheLayout:
        """Start every node, wire replication (and the cluster bus), return when healthy.

        ``password`` sets ``requirepass`` (and ``masterauth``); with ``username`` an ACL user
        of that name gets the same password and every permission. ``tls`` (``cert_file``,
        ``key_file``, ``ca_file``) makes every node TLS-only.
        """
        config = _with_acl_user(config, username, password)
        self._validate(name, cluster_mode, num_shards, replicas_per_shard, seed_rdbs)
        cache_dir = self.caches_dir / name
        try:
            cache_dir.mkdir()  # atomic: the creation lock between processes
        except FileExistsError:
            raise ReplicationGroupAlreadyExistsFault(f"cache {name} already exists", name=name) from None
        layout = CacheLayout(
            name=name,
            cluster_mode=cluster_mode,
            shards=[],
            password=password,
            tls=dict(tls) if tls else None,
            status="creating",
            detached=detached,
            owner_pid=os.getpid(),
            owner_start_time=own_start_time(),
        )
        self._write(layout)
        started: list[RedisProcess] = []
        try:
            layout.shards = self._start_nodes(layout, num_shards, replicas_per_shard, config, seed_rdbs, started)
            self._write(layout)  # PIDs on disk before any wiring that could hang
            if cluster_mode:
                self._form_cluster(layout)
            else:
                self._link_replicas(layout, layout.shards[0], layout.shards[0].replicas)
            for shard in layout.shards:
                self._wait_replication(layout, shard, self.ready_timeout)
            with self._client(layout.shards[0].primary, layout) as client:
                layout.engine, layout.engine_version = engine_from_info(client.info("server"))
            layout.status = "available"
            self._write(layout)
            return layout
        except BaseException:
            for node in started:
                with contextlib.suppress(Exception):
                    node.stop(timeout=5.0)
            shutil.rmtree(cache_dir, ignore_errors=True)
            raise

    def add_replicas(
        self,
        name: str,
        replicas_per_shard: int,
        *,
        config: Mapping[str, Any] | None = None,
        username: str | None = None,
        timeout: float | None = None,
    ) -> CacheLayout:
        """Give every shard of an existing cache ``replicas_per_shard`` replicas; return when in sync.

        Restore loads the primaries alone (a primary with replicas propagates every RESTORE,
        and the three processes fight for the same cores), then attaches the replicas: each
        full-syncs from its loaded primary with one diskless RDB transfer. Shards already at
        the count are left alone, so calling it twice is a no-op. ``config``/``username``
        as for :meth:`create_cache` (the password and TLS come from the cache's layout);
        ``timeout`` bounds the wait for the full syncs (default: the fleet's ready timeout).
        """
        if not 0 <= replicas_per_shard <= _MAX_REPLICAS:
            raise InvalidParameterValue(
                f"replicas_per_shard must be 0..{_MAX_REPLICAS}", replicas_per_shard=replicas_per_shard
            )
        layout = self.get_cache(name)
        # An empty new replica parses the RDB straight off the socket (no temp file on disk).
        config = _with_acl_user({"repl-diskless-load": "on-empty-db", **(config or {})}, username, layout.password)
        plan = [
            (index, member, None)
            for index, shard in enumerate(layout.shards)
            for member in range(1 + len(shard.replicas), 1 + replicas_per_shard)
        ]
        if not plan:
            return layout
        started: list[RedisProcess] = []
        try:
            with self._uncompressed_sync(layout):
                self._attach(layout, plan, config, started, timeout or self.ready_timeout)
            return layout
        except BaseException:
            for node in started:
                with contextlib.suppress(Exception):
                    node.stop(timeout=5.0)
            for shard in layout.shards:  # the layout on disk describes only running nodes
                shard.replicas = [r for r in shard.replicas if all(r.pid != n.pid for n in started)]
            self._write(layout)
            raise

    def _attach(
        self,
        layout: CacheLayout,
        plan: list[tuple[int, int, Path | None]],
        config: Mapping[str, Any] | None,
        started: list[RedisProcess],
        timeout: float,
    ) -> None:
        added = self._launch(layout, plan, config, started)
        new: dict[int, list[NodeAddr]] = {}
        for (index, _, _), node in zip(plan, added, strict=True):
            new.setdefault(index, []).append(node)
            layout.shards[index].replicas.append(node)
        self._write(layout)  # PIDs on disk before any wiring that could hang
        if layout.cluster_mode:
            self._join_replicas(layout, new)
        else:
            self._link_replicas(layout, layout.shards[0], new[0])
        for index in new:
            self._wait_replication(layout, layout.shards[index], timeout)

    @contextlib.contextmanager
    def _uncompressed_sync(self, layout: CacheLayout) -> Iterator[None]:
        """``rdbcompression no`` on the primaries while replicas full-sync, then as before.

        LZF over the whole dataset in the primary's fork made the sync 2-3x slower than the
        loopback transfer itself (256 MB: 2.3 s vs 0.8 s); the bytes never leave the host.
        """
        before: dict[str, str] = {}
        try:
            for shard in layout.shards:
                with self._client(shard.primary, layout) as client:
                    before[shard.primary.node_id] = str(client.config_get("rdbcompression")["rdbcompression"])
                    client.config_set("rdbcompression", "no")
            yield
        finally:
            for shard in layout.shards:
                if shard.primary.node_id in before:
                    with contextlib.suppress(redis.RedisError), self._client(shard.primary, layout) as client:
                        client.config_set("rdbcompression", before[shard.primary.node_id])

    def replicas_lagging(self, name: str) -> list[str]:
        """Node ids of the cache's replicas not in sync with their primary (link down, syncing, behind)."""
        layout = self.get_cache(name)
        with ThreadPoolExecutor(max_workers=min(8, len(layout.shards))) as pool:
            parts = pool.map(lambda shard: replicas_out_of_sync(self, layout, shard), layout.shards)
            return [node_id for part in parts for node_id in part]

    def _validate(
        self,
        name: str,
        cluster_mode: bool,
        num_shards: int,
        replicas_per_shard: int,
        seed_rdbs: list[Path] | None,
    ) -> None:
        if not _NAME_RE.match(name) or name.endswith("-"):
            raise InvalidParameterValue(
                f"invalid cache name {name!r}: 1-40 lowercase letters, digits or single hyphens, "
                "starting with a letter",
                name=name,
            )
        if not 1 <= num_shards <= _MAX_SHARDS:
            raise InvalidParameterValue(f"num_shards must be 1..{_MAX_SHARDS}", num_shards=num_shards)
        if not cluster_mode and num_shards != 1:
            raise InvalidParameterCombination("cluster mode disabled caches have exactly one shard")
        if not 0 <= replicas_per_shard <= _MAX_REPLICAS:
            raise InvalidParameterValue(
                f"replicas_per_shard must be 0..{_MAX_REPLICAS}", replicas_per_shard=replicas_per_shard
            )
        if seed_rdbs is not None:
            if len(seed_rdbs) != num_shards:
                raise InvalidParameterCombination(
                    f"{len(seed_rdbs)} seed RDBs for {num_shards} shards: need one per shard"
                )
            for rdb in seed_rdbs:
                if not Path(rdb).is_file():
                    raise InvalidParameterValue(f"seed RDB {rdb} does not exist", path=str(rdb))

    def _start_nodes(
        self,
        layout: CacheLayout,
        num_shards: int,
        replicas_per_shard: int,
        config: Mapping[str, Any] | None,
        seed_rdbs: list[Path] | None,
        started: list[RedisProcess],
    ) -> list[ShardLayout]:
        ranges = slot_ranges(num_shards) if layout.cluster_mode else [None] * num_shards
        plan: list[tuple[int, int, Path | None]] = []  # (shard index, member index, rdb)
        for shard in range(num_shards):
            for member in range(1 + replicas_per_shard):
                rdb = Path(seed_rdbs[shard]) if seed_rdbs is not None and member == 0 else None
                plan.append((shard, member, rdb))
        nodes = self._launch(layout, plan, config, started)
        shards: list[ShardLayout] = []
        for index in range(num_shards):
            members = [node for (shard, _, _), node in zip(plan, nodes, strict=True) if shard == index]
            slot = ranges[index]
            shards.append(
                ShardLayout(
                    shard_id=f"{index + 1:04d}",
                    slots=f"{slot[0]}-{slot[1]}" if slot else None,
                    primary=members[0],
                    replicas=members[1:],
                )
            )
        return shards

    def _launch(
        self,
        layout: CacheLayout,
        plan: list[tuple[int, int, Path | None]],
        config: Mapping[str, Any] | None,
        started: list[RedisProcess],
    ) -> list[NodeAddr]:
        """Start one node per ``(shard index, member index, seed rdb)``, in plan order."""
        cache_dir = self.caches_dir / layout.name

        def launch(item: tuple[int, int, Path | None]) -> NodeAddr:
            shard, member, rdb = item
            node_id = self._node_id(layout.name, shard, member)
            node = start_node(
                cache_dir / node_id,
                cluster_enabled=layout.cluster_mode,
                config=config,
                rdb_file=rdb,
                password=layout.password,
                tls=layout.tls,
                timeout=self.ready_timeout,
            )
            started.append(node)
            return NodeAddr(node_id=node_id, host=node.host, port=node.port, pid=node.pid, data_dir=str(node.data_dir))

        # In parallel: seeded primaries load their RDBs at the same time, like restore.
        with ThreadPoolExecutor(max_workers=min(8, len(plan))) as pool:
            futures = [pool.submit(launch, item) for item in plan]
            return [f.result() for f in futures]

    @staticmethod
    def _node_id(name: str, shard: int, member: int) -> str:
        return f"{name}-{shard + 1:04d}-{member + 1:03d}"

    def _client(self, node: NodeAddr, layout: CacheLayout, timeout: float = 10.0) -> redis.Redis:
        tls_ca = layout.tls["ca_file"] if layout.tls else None
        return node_client(
            node.host, node.port, password=layout.password, tls_ca=tls_ca, timeout=timeout, decode_responses=True
        )

    def _link_replicas(self, layout: CacheLayout, shard: ShardLayout, replicas: list[NodeAddr]) -> None:
        for replica in replicas:
            with self._client(replica, layout) as client:
                client.replicaof(shard.primary.host, shard.primary.port)

    def _wait_replication(self, layout: CacheLayout, shard: ShardLayout, timeout: float) -> None:
        """Until every replica of ``shard`` has its link up and is in sync (offsets equal)."""
        if not shard.replicas:
            return
        with self._client(shard.primary, layout) as primary:
            lagging: list[str] = []

            def synced() -> bool:
                lagging[:] = replicas_out_of_sync(self, layout, shard, primary)
                return not lagging

            try:
                wait_for(synced, timeout, f"the replicas of {shard.primary.node_id} to sync", interval=0.05)
            except RedisNodeError as exc:
                raise RedisNodeError(f"{exc}; not in sync: {', '.join(lagging)}") from None

    def _form_cluster(self, layout: CacheLayout) -> None:
        nodes = layout.nodes
        clients = {n.node_id: self._client(n, layout) for n in nodes}
        try:
            ids = {n.node_id: clients[n.node_id].execute_command("CLUSTER", "MYID") for n in nodes}
            for shard in layout.shards:
                self._assign_slots(clients[shard.primary.node_id], shard)
            # Distinct epochs up front, as redis-cli does, so no epoch collision has to be
            # resolved by gossip before the cluster settles.
            for epoch, node in enumerate(nodes, start=1):
                clients[node.node_id].execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
            for shard in layout.shards:
                self._replicate(clients, ids, shard, shard.replicas)
            # ... and only then does everyone meet everyone: the other nodes then learn each
            # replica's role from their first handshake instead of waiting for gossip.
            self._meet_all(clients, nodes)
            self._converge(layout, clients, ids)
        finally:
            for client in clients.values():
                client.close()

    def _join_replicas(self, layout: CacheLayout, new: Mapping[int, list[NodeAddr]]) -> None:
        """Bring new replica nodes into an existing cluster, each replicating its shard's primary."""
        nodes = layout.nodes
        clients = {n.node_id: self._client(n, layout) for n in nodes}
        try:
            ids = {n.node_id: clients[n.node_id].execute_command("CLUSTER", "MYID") for n in nodes}
            for index, replicas in new.items():
                self._replicate(clients, ids, layout.shards[index], replicas)
            added = [r for replicas in new.values() for r in replicas]
            self._meet_all(clients, added)
            self._converge(layout, clients, ids)
        finally:
            for client in clients.values():
                client.close()

    def _replicate(
        self, clients: Mapping[str, redis.Redis], ids: Mapping[str, str], shard: ShardLayout, replicas: list[NodeAddr]
    ) -> None:
        primary_id = ids[shard.primary.node_id]
        for replica in replicas:
            client = clients[replica.node_id]
            client.execute_command("CLUSTER", "MEET", shard.primary.host, shard.primary.port)
            # REPLICATE needs the primary to be known (handshake done) ...
            wait_for(
                lambda c=client, p=primary_id: bool(c.execute_command("CLUSTER", "REPLICATE", p)),
                self.ready_timeout,
                f"{replica.node_id} to replicate {shard.primary.node_id}",
            )

    @staticmethod
    def _meet_all(clients: Mapping[str, redis.Redis], nodes: list[NodeAddr]) -> None:
        """The first node (a primary) meets ``nodes``; never itself (a self-MEET lingers as a handshake)."""
        first_id, first = next(iter(clients.items()))
        for node in nodes:
            if node.node_id != first_id:
                first.execute_command("CLUSTER", "MEET", node.host, node.port)

    def _converge(self, layout: CacheLayout, clients: Mapping[str, redis.Redis], ids: Mapping[str, str]) -> None:
        expected: dict[str, str] = {}  # cluster node id -> its master's id, "-" for primaries
        for shard in layout.shards:
            expected[ids[shard.primary.node_id]] = "-"
            for replica in shard.replicas:
                expected[ids[replica.node_id]] = ids[shard.primary.node_id]

        def converged(client: redis.Redis) -> bool:
            # Every node must see every role, else a CLUSTER SHARDS right after
            # creation still shows a replica as an empty primary (gossip lag).
            if client.cluster("info").get("cluster_state") != "ok":
                return False
            return _roles(_cluster_nodes(client)) == expected

        for node in layout.nodes:
            wait_for(
                lambda c=clients[node.node_id]: converged(c),
                self.ready_timeout,
                f"cluster_state:ok and a converged view on {node.node_id}",
                interval=0.05,
            )

    def _assign_slots(self, client: redis.Redis, shard: ShardLayout) -> None:
        wanted = shard.slot_range()
        assert wanted is not None
        # A node that loaded a seed RDB has already claimed the slots its keys live in.
        owned = _own_slots(client)
        outside = [s for s in owned if not wanted[0] <= s <= wanted[1]]
        if outside:
            raise InvalidParameterValue(
                f"seed RDB of shard {shard.shard_id} holds keys in slots outside {shard.slots} "
                f"(e.g. slot {outside[0]}); seed each shard with its own RDB",
                shard_id=shard.shard_id,
            )
        for start, end in compress_slots(s for s in range(wanted[0], wanted[1] + 1) if s not in owned):
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", start, end)

    # ----- find ---------------------------------------------------------------------

    def _layout_path(self, name: str) -> Path:
        return self.caches_dir / name / LAYOUT_FILE

    def _write(self, layout: CacheLayout) -> None:
        path = self._layout_path(layout.name)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(layout.to_dict(), indent=2))
        tmp.chmod(0o600)  # holds the nodes' password when the cache has AUTH
        os.replace(tmp, path)  # readers never see half a file

    def _read(self, name: str) -> CacheLayout | None:
        try:
            return CacheLayout.from_dict(json.loads(self._layout_path(name).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def get_cache(self, name: str) -> CacheLayout:
        layout = self._read(name)
        if layout is None or layout.status != "available":
            raise ReplicationGroupNotFoundFault(f"cache {name} not found", name=name)
        return layout

    def list_caches(self) -> list[CacheLayout]:
        layouts = (self._read(p.name) for p in sorted(self.caches_dir.iterdir()) if p.is_dir())
        return [layout for layout in layouts if layout is not None and layout.status == "available"]

    def find_node(self, node_id: str) -> tuple[CacheLayout, NodeAddr]:
        for layout in self.list_caches():
            for node in layout.nodes:
                if node.node_id == node_id:
                    return layout, node
        raise InvalidParameterValue(f"no local node {node_id}", node_id=node_id)

    # ----- stop ---------------------------------------------------------------------

    def _stop_dir(self, cache_dir: Path) -> None:
        """Stop every node found under ``cache_dir`` (pidfiles, not only the JSON)."""
        nodes: dict[int, RedisProcess] = {}
        layout = self._read(cache_dir.name)
        if layout is not None:
            for n in layout.nodes:
                nodes[n.pid] = RedisProcess(n.host, n.port, n.pid, Path(n.data_dir), layout.password, _ca(layout))
        for sub in sorted(p for p in cache_dir.iterdir() if p.is_dir()):
            found = node_from_dir(sub)
            if found is not None:
                nodes.setdefault(found.pid, found)
        errors: list[str] = []
        for node in nodes.values():
            try:
                node.stop()  # verifies the PID is our redis before signalling
            except RedisNodeError as exc:
                errors.append(str(exc))
        if errors:
            raise RedisNodeError("; ".join(errors))

    def destroy_cache(self, name: str) -> None:
        cache_dir = self.caches_dir / name
        if not cache_dir.is_dir():
            raise ReplicationGroupNotFoundFault(f"cache {name} not found", name=name)
        self._stop_dir(cache_dir)
        shutil.rmtree(cache_dir, ignore_errors=True)

    def stop_all(self) -> None:
        for cache_dir in sorted(p for p in self.caches_dir.iterdir() if p.is_dir()):
            self.destroy_cache(cache_dir.name)

    def kill_node(self, node_id: str) -> NodeAddr:
        """SIGKILL one node (fault injection); the cache keeps describing it."""
        layout, node = self.find_node(node_id)
        RedisProcess(node.host, node.port, node.pid, Path(node.data_dir), layout.password, _ca(layout)).kill()
        return node

    def node_alive(self, node: NodeAddr) -> bool:
        return is_our_redis(node.pid, node.port, Path(node.data_dir))

    def reap_stale(self) -> list[str]:
        """Remove caches whose owner died or whose every node is gone; returns their names.

        A cache stays if it is detached (or owned by a live process) and at least one of
        its nodes runs: a degraded cache (a killed replica) is still a cache.
        """
        reaped: list[str] = []
        for cache_dir in sorted(p for p in self.caches_dir.iterdir() if p.is_dir()):
            layout = self._read(cache_dir.name)
            if layout is None:
                stale = not _any_node_running(cache_dir) and _older_than(cache_dir, 60.0)
            else:
                owner_alive = process_alive(layout.owner_pid, layout.owner_start_time)
                owner_matters = layout.status != "available" or not layout.detached
                any_alive = any(self.node_alive(n) for n in layout.nodes) or _any_node_running(cache_dir)
                stale = (owner_matters and not owner_alive) or (layout.status == "available" and not any_alive)
            if stale:
                self._stop_dir(cache_dir)
                shutil.rmtree(cache_dir, ignore_errors=True)
                reaped.append(cache_dir.name)
        return reaped


def replicas_out_of_sync(
    fleet: Fleet, layout: CacheLayout, shard: ShardLayout, primary: redis.Redis | None = None
) -> list[str]:
    """Node ids of ``shard``'s replicas whose link is down, still syncing, or behind the primary."""
    if not shard.replicas:
        return []
    own = primary is None
    client = primary if primary is not None else fleet._client(shard.primary, layout)
    try:
        seen = client.info("replication")
    finally:
        if own:
            client.close()
    offset = int(seen["master_repl_offset"])
    online = {
        int(v["port"])
        for k, v in seen.items()
        if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
    }
    lagging: list[str] = []
    for replica in shard.replicas:
        with fleet._client(replica, layout) as rc:
            info = rc.info("replication")
        if (
            replica.port not in online
            or info.get("master_link_status") != "up"
            or int(info.get("master_sync_in_progress", 1)) != 0
            or int(info.get("master_repl_offset", -1)) != offset
        ):
            lagging.append(replica.node_id)
    return lagging


def _with_acl_user(
    config: Mapping[str, Any] | None, username: str | None, password: str | None
) -> Mapping[str, Any] | None:
    """``config`` plus an ACL user ``username`` with ``password`` and every permission."""
    if not username:
        return config
    if not password:
        raise InvalidParameterCombination("an ACL user needs a password")
    return {**(config or {}), "user": [username, "on", f">{password}", "~*", "&*", "+@all"]}


def _ca(layout: CacheLayout) -> str | None:
    return layout.tls["ca_file"] if layout.tls else None


def _any_node_running(cache_dir: Path) -> bool:
    for sub in cache_dir.iterdir():
        node = node_from_dir(sub) if sub.is_dir() else None
        if node is not None and node.alive():
            return True
    return False


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def _cluster_nodes(client: redis.Redis) -> str:
    # execute_command with split words bypasses redis-py's CLUSTER NODES parser: raw text.
    reply = client.execute_command("CLUSTER", "NODES")
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _roles(nodes_text: str) -> dict[str, str]:
    roles: dict[str, str] = {}
    for line in nodes_text.splitlines():
        parts = line.split()
        if len(parts) >= 8:
            roles[parts[0]] = parts[3] if "slave" in parts[2].split(",") else "-"
    return roles


def _own_slots(client: redis.Redis) -> set[int]:
    owned: set[int] = set()
    for line in _cluster_nodes(client).splitlines():
        parts = line.split()
        if len(parts) < 8 or "myself" not in parts[2]:
            continue
        for item in parts[8:]:
            if item.startswith("["):
                continue  # migrating/importing markers
            start, _, end = item.partition("-")
            owned.update(range(int(start), int(end or start) + 1))
    return owned
