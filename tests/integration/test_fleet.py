"""The local fleet against real redis-server processes: layout, replication, seeding, cleanup."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cachevault.core.errors import (
    InvalidParameterValue,
    ReplicationGroupAlreadyExistsFault,
    ReplicationGroupNotFoundFault,
)
from cachevault.nodes.slots import key_slot
from cachevault_tools.local.fleet import CacheLayout, Fleet, NodeAddr, ShardLayout, slot_ranges
from cachevault_tools.local.redis_process import (
    ChildReaper,
    RedisNodeError,
    _bindable,
    free_port,
    is_our_redis,
    process_alive,
    reap_exited_children,
    start_node,
)
from redis.cluster import ClusterNode, RedisCluster

from tests.product_fixtures import wait_until
from tests.redis_fixtures import own_fleet

REPO = Path(__file__).resolve().parents[2]


def _client(node: NodeAddr, **kwargs: object) -> redis.Redis:
    return redis.Redis(host=node.host, port=node.port, socket_timeout=10, decode_responses=True, **kwargs)


def _save_rdb(node: NodeAddr, dest: Path) -> Path:
    with _client(node) as client:
        client.save()
    shutil.copyfile(Path(node.data_dir) / "dump.rdb", dest)
    return dest


def _digest(node: NodeAddr) -> str:
    with _client(node) as client:
        return str(client.execute_command("DEBUG", "DIGEST"))


def _pids_gone(nodes: list[NodeAddr]) -> bool:
    return all(not is_our_redis(n.pid, n.port, Path(n.data_dir)) and not process_alive(n.pid) for n in nodes)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    yield from own_fleet(tmp_path_factory, "fleet-tests")


@pytest.fixture(scope="module")
def standalone(fleet: Fleet) -> CacheLayout:
    return fleet.create_cache("std", cluster_mode=False, replicas_per_shard=2)


@pytest.fixture(scope="module")
def cluster(fleet: Fleet) -> CacheLayout:
    return fleet.create_cache("clu", cluster_mode=True, num_shards=3, replicas_per_shard=1)


def test_slot_split_matches_elasticache() -> None:
    assert slot_ranges(3) == [(0, 5460), (5461, 10922), (10923, 16383)]
    assert slot_ranges(2) == [(0, 8191), (8192, 16383)]
    for shards in (1, 4, 5, 7, 90):
        ranges = slot_ranges(shards)
        assert ranges[0][0] == 0 and ranges[-1][1] == 16383
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges))


def test_standalone_replicates_to_every_replica(fleet: Fleet, standalone: CacheLayout) -> None:
    shard = standalone.shards[0]
    assert [n.node_id for n in shard.nodes] == ["std-0001-001", "std-0001-002", "std-0001-003"]
    assert shard.slots is None and not standalone.cluster_mode
    assert (standalone.engine, standalone.status) == ("redis", "available")
    with _client(shard.primary) as primary:
        assert primary.info("server")["redis_version"] == standalone.engine_version
        with primary.pipeline(transaction=False) as pipe:
            for i in range(200):
                pipe.set(f"k:{i}", f"v{i}")
            pipe.hset("h", mapping={"a": "1", "b": "2"})
            pipe.execute()
        assert primary.wait(2, 5000) == 2
    for replica in shard.replicas:
        with _client(replica) as client:
            assert client.info("replication")["role"] == "slave"
            assert client.dbsize() == 201
            assert client.mget([f"k:{i}" for i in range(200)]) == [f"v{i}" for i in range(200)]
            assert client.hgetall("h") == {"a": "1", "b": "2"}
    # Another process only has the state dir: the JSON describes the same cache.
    again = Fleet(fleet.state_dir).get_cache("std")
    assert again == standalone
    assert CacheLayout.from_dict(json.loads(json.dumps(standalone.to_dict()))) == standalone


def test_cluster_routes_keys_and_replicas_serve_them(cluster: CacheLayout) -> None:
    assert [s.slots for s in cluster.shards] == ["0-5460", "5461-10922", "10923-16383"]
    assert [s.primary.node_id for s in cluster.shards] == ["clu-0001-001", "clu-0002-001", "clu-0003-001"]
    assert [r.node_id for s in cluster.shards for r in s.replicas] == [
        "clu-0001-002",
        "clu-0002-002",
        "clu-0003-002",
    ]
    seed = cluster.shards[0].primary
    keys = {f"user:{i}": str(i * 7) for i in range(300)}
    rc = RedisCluster(startup_nodes=[ClusterNode(seed.host, seed.port)], decode_responses=True)
    try:
        rc.mset_nonatomic(keys)
        assert rc.get("user:42") == "294"
    finally:
        rc.close()
    total = 0
    for shard in cluster.shards:
        lo, hi = shard.slot_range() or (0, -1)
        mine = {k: v for k, v in keys.items() if lo <= key_slot(k.encode()) <= hi}
        assert mine, "300 keys must land in every shard"
        with _client(shard.primary) as primary:
            assert primary.dbsize() == len(mine)
            assert primary.wait(1, 5000) == 1
        with _client(shard.replicas[0]) as replica:
            replica.execute_command("READONLY")
            assert replica.dbsize() == len(mine)
            with replica.pipeline(transaction=False) as pipe:
                for key in mine:
                    pipe.get(key)  # one GET per key: MGET across slots is CROSSSLOT
                assert pipe.execute() == list(mine.values())
        total += len(mine)
    assert total == len(keys)


def test_seed_standalone_from_rdb(fleet: Fleet, standalone: CacheLayout, tmp_path: Path) -> None:
    source = standalone.shards[0].primary
    with _client(source) as client:
        client.set("seeded", "yes")
        client.expire("k:1", 3600)
    rdb = _save_rdb(source, tmp_path / "std.rdb")
    seeded = fleet.create_cache("std-seeded", cluster_mode=False, replicas_per_shard=1, seed_rdbs=[rdb])
    try:
        want = _digest(source)
        assert want != "0" * 40
        assert [_digest(n) for n in seeded.shards[0].nodes] == [want, want]
        with _client(seeded.shards[0].replicas[0]) as replica:
            assert replica.get("seeded") == "yes"
            assert 0 < replica.ttl("k:1") <= 3600
        assert rdb.exists(), "the seed file is never consumed"
    finally:
        fleet.destroy_cache("std-seeded")


def test_seed_cluster_one_rdb_per_shard(fleet: Fleet, cluster: CacheLayout, tmp_path: Path) -> None:
    rc = RedisCluster(startup_nodes=[ClusterNode(*cluster.shards[0].primary.endpoint)], decode_responses=True)
    try:
        rc.mset_nonatomic({f"seed:{i}": str(i) for i in range(90)})
    finally:
        rc.close()
    rdbs = [_save_rdb(s.primary, tmp_path / f"{s.shard_id}.rdb") for s in cluster.shards]
    seeded = fleet.create_cache("clu-seeded", cluster_mode=True, num_shards=3, replicas_per_shard=1, seed_rdbs=rdbs)
    try:
        for old, new in zip(cluster.shards, seeded.shards, strict=True):
            assert new.slots == old.slots
            assert _digest(new.primary) == _digest(old.primary) == _digest(new.replicas[0])
            with _client(new.primary) as client:
                assert client.cluster("info")["cluster_state"] == "ok"
                # Slots claimed from the seed keys plus the ones added: exactly the shard range.
                lo, hi = new.slot_range() or (0, -1)
                owned = client.execute_command("CLUSTER", "SLOTS")
                mine = [(int(r[0]), int(r[1])) for r in owned if int(r[2][1]) == new.primary.port]
                assert min(a for a, _ in mine) == lo and max(b for _, b in mine) == hi
                assert sum(b - a + 1 for a, b in mine) == hi - lo + 1
    finally:
        fleet.destroy_cache("clu-seeded")
    # Seeds in the wrong order put keys in slots another shard owns: refused, nothing left.
    with pytest.raises(InvalidParameterValue, match="outside"):
        fleet.create_cache("clu-bad", cluster_mode=True, num_shards=3, replicas_per_shard=0, seed_rdbs=rdbs[::-1])
    assert not (fleet.caches_dir / "clu-bad").exists()


def test_destroy_leaves_no_process(fleet: Fleet) -> None:
    layout = fleet.create_cache("gone", cluster_mode=False, replicas_per_shard=1, password="s3cret")
    nodes = layout.nodes
    assert all(fleet.node_alive(n) for n in nodes)
    with pytest.raises(ReplicationGroupAlreadyExistsFault):
        fleet.create_cache("gone", cluster_mode=False)
    fleet.destroy_cache("gone")
    assert _pids_gone(nodes)
    assert not (fleet.caches_dir / "gone").exists()
    with pytest.raises(ReplicationGroupNotFoundFault):
        fleet.get_cache("gone")
    assert "gone" not in [c.name for c in fleet.list_caches()]


def test_bad_names_and_bad_config_fail_clearly(fleet: Fleet, tmp_path: Path) -> None:
    for bad in ("1abc", "has--double", "trailing-", "UPPER", "x" * 41, "under_score"):
        with pytest.raises(InvalidParameterValue):
            fleet.create_cache(bad, cluster_mode=False)
    with pytest.raises(RedisNodeError, match="Bad directive"):
        start_node(tmp_path / "bad", config={"no-such-directive": "1"}, timeout=5)
    port = free_port(cluster_bus=True)
    assert port <= 55535 and _bindable(port) and _bindable(port + 10000)


_CRASHER = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    from cachevault_tools.local.fleet import Fleet
    fleet = Fleet(Path(sys.argv[1]))
    owned = fleet.create_cache("owned", cluster_mode=False, replicas_per_shard=1)
    kept = fleet.create_cache("kept", cluster_mode=False, replicas_per_shard=1, detached=True)
    print(json.dumps([owned.to_dict(), kept.to_dict()]), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # crash: no cleanup runs
    """
)


def test_reap_after_owner_crash(tmp_path: Path) -> None:
    state = tmp_path / "state"
    fleet = Fleet(state)
    try:  # from the start: a crasher that times out or fails must not leave its nodes running
        run = subprocess.run(
            [sys.executable, "-c", _CRASHER, str(state)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO / "layers/cachevault/python")},
        )
        assert run.returncode == -signal.SIGKILL, run.stderr
        owned, kept = (CacheLayout.from_dict(d) for d in json.loads(run.stdout))
        assert all(fleet.node_alive(n) for n in owned.nodes + kept.nodes), "nodes outlive their creator"
        assert Fleet(state, reap=True).list_caches() == [kept]
        assert _pids_gone(owned.nodes)
        assert not (state / "caches" / "owned").exists()
        assert all(fleet.node_alive(n) for n in kept.nodes)
        # A detached cache whose every node died is cleaned up as well.
        for node in kept.nodes:
            fleet.kill_node(node.node_id)
        assert _pids_gone(kept.nodes)
        assert fleet.reap_stale() == ["kept"]
        assert fleet.list_caches() == []
    finally:
        fleet.stop_all()


def test_reap_never_signals_a_foreign_pid(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "state")
    finished = subprocess.Popen(["true"])
    finished.wait(timeout=5)  # a creator that is gone
    bystander = subprocess.Popen(["sleep", "30"])  # a live PID that is not a redis-server
    try:
        node_dir = fleet.caches_dir / "ghost" / "ghost-0001-001"
        node_dir.mkdir(parents=True)
        node = NodeAddr("ghost-0001-001", "127.0.0.1", free_port(), bystander.pid, str(node_dir))
        ghost = CacheLayout(
            "ghost", False, [ShardLayout("0001", None, node, [])], status="creating", owner_pid=finished.pid
        )
        (fleet.caches_dir / "ghost" / "cache.json").write_text(json.dumps(ghost.to_dict()))
        (node_dir / "redis.pid").write_text(str(bystander.pid))
        (node_dir / "redis.conf").write_text(f"port {node.port}\n")
        assert fleet.reap_stale() == ["ghost"]
        assert not (fleet.caches_dir / "ghost").exists()
        assert bystander.poll() is None, "a PID that is not our redis-server is never signalled"
    finally:
        bystander.kill()
        bystander.wait(timeout=5)


def _fill(node: NodeAddr, keys: int, **kwargs: object) -> None:
    with _client(node, **kwargs) as client:
        pipe = client.pipeline(transaction=False)
        for i in range(keys):
            pipe.set(f"{{s}}k:{i}", f"v{i}" * 20)
            pipe.hset(f"{{s}}h:{i}", mapping={"a": str(i)})
        pipe.execute()


def test_add_replicas_to_a_loaded_standalone_cache(fleet: Fleet) -> None:
    layout = fleet.create_cache("addrep", cluster_mode=False, replicas_per_shard=0, password="pw-1")
    try:
        primary = layout.shards[0].primary
        _fill(primary, 2000, password="pw-1")  # loaded alone, as restore does
        grown = fleet.add_replicas("addrep", 2)
        assert [n.node_id for n in grown.shards[0].replicas] == ["addrep-0001-002", "addrep-0001-003"]
        assert fleet.get_cache("addrep").to_dict() == grown.to_dict()  # persisted
        with _client(primary, password="pw-1") as client:
            want = str(client.execute_command("DEBUG", "DIGEST"))
            assert client.config_get("rdbcompression")["rdbcompression"] == "yes"  # set back after the sync
        for replica in grown.shards[0].replicas:
            with _client(replica, password="pw-1") as client:
                info = client.info("replication")
                assert info["role"] == "slave" and info["master_link_status"] == "up"
                assert info["master_port"] == primary.port
                assert str(client.execute_command("DEBUG", "DIGEST")) == want
                assert client.dbsize() == 4000
        # Twice: nothing started, nothing changed.
        again = fleet.add_replicas("addrep", 2)
        assert [n.pid for n in again.nodes] == [n.pid for n in grown.nodes]
        assert fleet.add_replicas("addrep", 1).to_dict() == grown.to_dict()
    finally:
        fleet.destroy_cache("addrep")


def test_add_replicas_to_a_loaded_cluster(fleet: Fleet) -> None:
    layout = fleet.create_cache("addclu", cluster_mode=True, num_shards=2, replicas_per_shard=0)
    try:
        rc = RedisCluster(startup_nodes=[ClusterNode(*layout.shards[0].primary.endpoint)], decode_responses=True)
        try:
            for i in range(1000):
                rc.set(f"ck:{i}", str(i))
        finally:
            rc.close()
        grown = fleet.add_replicas("addclu", 1)
        assert [[r.node_id for r in s.replicas] for s in grown.shards] == [["addclu-0001-002"], ["addclu-0002-002"]]
        for shard in grown.shards:
            (replica,) = shard.replicas
            assert _digest(replica) == _digest(shard.primary) != "0" * 40
            with _client(replica) as client:
                assert client.info("replication")["master_link_status"] == "up"
                myid = client.execute_command("CLUSTER", "MYID")
            # Every node knows the new replica's role (a converged cluster).
            for node in grown.nodes:
                with _client(node) as client:
                    line = next(x for x in str(client.execute_command("CLUSTER", "NODES")).splitlines()
                                if x.startswith(myid))  # fmt: skip
                    assert "slave" in line.split()[2]
        again = fleet.add_replicas("addclu", 1)
        assert [n.pid for n in again.nodes] == [n.pid for n in grown.nodes]
    finally:
        fleet.destroy_cache("addclu")


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_a_node_killed_by_another_process_is_reaped_by_its_parent(tmp_path: Path) -> None:
    """What the embedded AWS's reaper does: a node stopped from outside leaves no zombie."""
    node = start_node(tmp_path / "node")
    reaper = ChildReaper(interval_s=0.05).start()
    try:
        os.kill(node.pid, signal.SIGKILL)  # as `cache delete` in another process does, by PID
        # Not reaped, it would stay in the process table as a zombie ("Z") for good.
        wait_until(lambda: _proc_state(node.pid) is None, 10, "the killed node to leave the process table")
        assert node.pid not in reap_exited_children()  # waited for once, and forgotten
    finally:
        reaper.stop()
        node.stop()
