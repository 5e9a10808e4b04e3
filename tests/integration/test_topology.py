"""Topology discovery, source choice, engine and memory facts against real redis-server nodes."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator

import pytest
import redis
from cachevault.core.errors import InvalidParameterValue, InvalidReplicationGroupState
from cachevault.nodes import topology
from cachevault.nodes.topology import Topology, choose_source, discover, engine_info, node_memory
from cachevault_tools.local.fleet import CacheLayout, Fleet, NodeAddr
from cachevault_tools.local.redis_process import free_port, server_path
from redis.cluster import ClusterNode, RedisCluster

from tests.product_fixtures import wait_until
from tests.redis_fixtures import own_fleet


def _ep(node: NodeAddr) -> tuple[str, int]:
    return (node.host, node.port)


def _shape(topo: Topology) -> list[tuple[str, list[tuple[int, int]], tuple[str, int], set[tuple[str, int]]]]:
    return [
        (s.shard_id, s.slots, (s.primary.host, s.primary.port), {(r.host, r.port) for r in s.replicas})
        for s in topo.shards
    ]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    yield from own_fleet(tmp_path_factory, "topology-tests")


@pytest.fixture(scope="module")
def standalone(fleet: Fleet) -> CacheLayout:
    layout = fleet.create_cache("tstd", cluster_mode=False, replicas_per_shard=2, config={"maxmemory": "64mb"})
    with redis.Redis(*_ep(layout.shards[0].primary), socket_timeout=10) as client:
        client.mset({f"k{i}": "x" * 100 for i in range(500)})
        assert client.wait(2, 5000) == 2
    return layout


@pytest.fixture(scope="module")
def cluster(fleet: Fleet) -> CacheLayout:
    layout = fleet.create_cache("tclu", cluster_mode=True, num_shards=3, replicas_per_shard=1)
    rc = RedisCluster(startup_nodes=[ClusterNode(*_ep(layout.shards[0].primary))])
    try:
        rc.mset_nonatomic({f"k{i}": "v" for i in range(300)})
    finally:
        rc.close()
    for shard in layout.shards:
        with redis.Redis(*_ep(shard.primary), socket_timeout=10) as client:
            assert client.wait(1, 5000) == 1
    return layout


def test_standalone_discovered_from_any_node(standalone: CacheLayout) -> None:
    shard = standalone.shards[0]
    from_replica = discover([_ep(shard.replicas[1])])
    from_primary = discover([_ep(shard.primary)])
    assert not from_replica.cluster_mode
    assert _shape(from_replica) == _shape(from_primary)
    (found,) = from_replica.shards
    assert (found.shard_id, found.slots) == ("0001", [])
    assert (found.primary.port, found.primary.role, found.primary.link_up) == (shard.primary.port, "primary", True)
    assert {r.port for r in found.replicas} == {r.port for r in shard.replicas}
    for replica in found.replicas:
        assert replica.role == "replica" and replica.link_up
        assert replica.repl_offset is not None and replica.repl_offset > 50_000  # 500 x 100 B arrived
        assert replica.lag_bytes is not None and 0 <= replica.lag_bytes < 1000
        assert replica.run_id and len(replica.run_id) == 40
    # A dead first seed is skipped; nothing reachable is a clear error.
    dead = ("127.0.0.1", free_port())
    assert _shape(discover([dead, _ep(shard.primary)], timeout=1)) == _shape(from_primary)
    with pytest.raises(InvalidReplicationGroupState, match="no seed endpoint answered"):
        discover([dead], timeout=1)


def test_cluster_discovered_with_slots_and_replicas(cluster: CacheLayout) -> None:
    topo = discover([_ep(cluster.shards[2].replicas[0])])
    assert topo.cluster_mode
    assert [s.slots for s in topo.shards] == [[(0, 5460)], [(5461, 10922)], [(10923, 16383)]]
    assert [s.shard_id for s in topo.shards] == ["0001", "0002", "0003"]
    for found, built in zip(topo.shards, cluster.shards, strict=True):
        assert found.primary.port == built.primary.port and found.primary.link_up
        assert [r.port for r in found.replicas] == [r.port for r in built.replicas]
        for node in found.nodes:
            assert node.node_id and re.fullmatch(r"[0-9a-f]{40}", node.node_id)
        (replica,) = found.replicas
        assert replica.link_up and replica.lag_bytes is not None and replica.lag_bytes < 1000
        assert found.primary.repl_offset and found.primary.repl_offset > 0
    # Step Functions carries it as JSON between states.
    assert Topology.from_dict(json.loads(json.dumps(topo.to_dict()))) == topo


def test_cluster_nodes_fallback_agrees_with_cluster_shards(cluster: CacheLayout) -> None:
    primary = cluster.shards[0].primary
    with redis.Redis(*_ep(primary), decode_responses=True) as client:
        text = client.execute_command("CLUSTER", "NODES")
    auth = topology._Auth(None, None, 5.0)
    via_nodes = topology._health_check(topology._shards_from_cluster_nodes(text, "127.0.0.1"), auth)
    assert _shape(Topology(True, via_nodes)) == _shape(discover([_ep(primary)]))


def test_choose_source_in_cluster_and_after_kills(fleet: Fleet) -> None:
    layout = fleet.create_cache("kc", cluster_mode=True, num_shards=1, replicas_per_shard=2)
    try:
        seed = [_ep(layout.shards[0].primary)]
        (shard,) = discover(seed).shards
        assert shard.slots == [(0, 16383)] and len(shard.replicas) == 2
        picked = choose_source(shard)
        assert picked.role == "replica" and picked.link_up
        second = next(r for r in shard.replicas if r.port != picked.port)
        assert choose_source(shard, second.endpoint) == second
        assert choose_source(shard, second.node_id) == second
        assert choose_source(shard, shard.primary.endpoint) == shard.primary  # named explicitly
        with pytest.raises(InvalidParameterValue, match="not part of shard"):
            choose_source(shard, "127.0.0.1:1")

        node_by_port = {n.port: n for n in layout.nodes}
        fleet.kill_node(node_by_port[picked.port].node_id)
        (shard,) = discover(seed, timeout=1).shards
        dead = next(r for r in shard.replicas if r.port == picked.port)
        assert not dead.link_up and dead.lag_bytes is None
        assert choose_source(shard).port == second.port
        with pytest.raises(InvalidReplicationGroupState, match="not healthy"):
            choose_source(shard, dead.endpoint)

        fleet.kill_node(node_by_port[second.port].node_id)
        (shard,) = discover(seed, timeout=1).shards
        assert not any(r.link_up for r in shard.replicas)
        with pytest.raises(InvalidReplicationGroupState, match="no healthy replica"):
            choose_source(shard)
        assert choose_source(shard, allow_primary=True) == shard.primary
    finally:
        fleet.destroy_cache("kc")


def test_replica_without_primary_is_unhealthy(fleet: Fleet) -> None:
    layout = fleet.create_cache("orphan", cluster_mode=False, replicas_per_shard=1)
    try:
        shard_layout = layout.shards[0]
        fleet.kill_node(shard_layout.primary.node_id)
        replica_ep = _ep(shard_layout.replicas[0])
        with redis.Redis(*replica_ep, decode_responses=True) as client:
            # The replica notices the dead primary on its own schedule (its replication cron,
            # about once a second): wait for that, the state in which it answers -NOMASTERLINK.
            link_down = lambda: client.info("replication")["master_link_status"] == "down"  # noqa: E731
            wait_until(link_down, 30, "the replica to see its master link down")
            with pytest.raises(redis.ResponseError, match="NOMASTERLINK"):
                client.execute_command("SYNC")
        (shard,) = discover([replica_ep], timeout=1).shards
        assert shard.primary.port == shard_layout.primary.port and not shard.primary.link_up
        (replica,) = shard.replicas
        assert replica.port == shard_layout.replicas[0].port and not replica.link_up
        with pytest.raises(InvalidReplicationGroupState, match="primary is down"):
            choose_source(shard, allow_primary=True)
    finally:
        fleet.destroy_cache("orphan")


def test_password_protected_cache(fleet: Fleet) -> None:
    layout = fleet.create_cache("auth", cluster_mode=False, replicas_per_shard=1, password="pw-123")
    try:
        seed = [_ep(layout.shards[0].replicas[0])]
        (shard,) = discover(seed, password="pw-123").shards
        assert shard.primary.link_up and [r.link_up for r in shard.replicas] == [True]
        with pytest.raises(InvalidReplicationGroupState):
            discover(seed, timeout=1)
    finally:
        fleet.destroy_cache("auth")


def test_engine_info_and_rdb_versions(standalone: CacheLayout) -> None:
    banner = subprocess.run([server_path(), "--version"], capture_output=True, text=True, check=True).stdout
    version = re.search(r"v=(\d+\.\d+\.\d+)", banner)
    assert version is not None
    engine, found, rdb = engine_info(*_ep(standalone.shards[0].primary))
    assert (engine, found) == ("redis", version.group(1)) == (standalone.engine, standalone.engine_version)
    assert rdb == topology.rdb_version_for("redis", found)
    expected = {
        ("redis", "6.2.14"): 9,
        ("redis", "7.0.15"): 10,
        ("redis", "7.2.4"): 11,
        ("redis", "7.4.1"): 12,
        ("redis", "8.0.2"): 12,
        ("valkey", "7.2.5"): 11,
        ("valkey", "8.0.1"): 11,
    }
    assert {k: topology.rdb_version_for(*k) for k in expected} == expected
    valkey_info = {"redis_version": "7.2.4", "valkey_version": "8.0.1", "server_name": "valkey"}
    assert topology.engine_from_info(valkey_info) == ("valkey", "8.0.1")


def test_node_memory(standalone: CacheLayout) -> None:
    memory = node_memory(*_ep(standalone.shards[0].replicas[0]))
    assert memory["maxmemory"] == 64 * 1024 * 1024
    assert memory["used_memory"] > 500 * 100  # the 500 values are there
    assert memory["total_system_memory"] > memory["used_memory"]
    assert memory["maxmemory_policy"] == "noeviction"
