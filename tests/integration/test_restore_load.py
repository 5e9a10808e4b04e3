"""RESTORE loader and verification against real redis-server processes.

A source server gets a mixed dataset; DUMP + PTTL of every key becomes RestoreEntry items,
which are loaded into a standalone target and into 3- and 2-shard clusters.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from cachevault.core.errors import InvalidParameterCombination, RestoreFailed
from cachevault.nodes.slots import even_split, key_slot
from cachevault.rdb.reader import RdbFile
from cachevault.restore.load import (
    LoadResult,
    RestoreEntry,
    ShardLoader,
    TargetShard,
    entries_from_rdb,
    load_entries,
    load_functions,
)
from cachevault.restore.verify import cache_digest, combined_digest, verify_restore

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _verify_all(targets: Sequence[TargetShard], result: LoadResult, entries: list[RestoreEntry]) -> dict[str, Any]:
    """verify_restore of a finished load, every entry sampled."""
    return verify_restore(
        targets,
        expected_keys_per_target=result.keys_per_target,
        keys_with_ttl_per_target=[t.keys_with_ttl for t in result.targets],
        samples=entries,
        sample_limit=len(entries),
    )


# -- tiny local fleet helper (start/stop by PID) ---------------------------------------------


def _free_port() -> int:
    # Cluster nodes also need port+10000 for the bus (we pass cluster-port explicitly instead).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Node:
    port: int
    proc: subprocess.Popen
    bus_port: int = 0

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db, socket_timeout=30, socket_connect_timeout=5)


def _start(tmp: Path, *, cluster: bool = False) -> Node:
    port = _free_port()
    data = tmp / f"node-{port}"
    data.mkdir(parents=True)
    args = [
        REDIS_SERVER,
        "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
        "--save", "", "--appendonly", "no", "--enable-debug-command", "yes", "--daemonize", "no",
        "--logfile", str(data / "redis.log"),
    ]  # fmt: skip
    bus_port = _free_port() if cluster else 0
    if cluster:
        args += ["--cluster-enabled", "yes", "--cluster-config-file", str(data / "nodes.conf"),
                 "--cluster-port", str(bus_port), "--cluster-node-timeout", "5000"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node = Node(port, proc, bus_port)
    deadline = time.monotonic() + 10
    while True:
        try:
            if node.client().ping():
                return node
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop([node])
                raise RuntimeError(f"redis-server on {port} did not start") from None
            time.sleep(0.02)


def _stop(nodes: list[Node]) -> None:
    for n in nodes:
        if n.proc.poll() is None:
            n.proc.terminate()
    for n in nodes:
        try:
            n.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            n.proc.kill()
            n.proc.wait(timeout=10)


def _make_cluster(tmp: Path, shards: int) -> list[Node]:
    nodes: list[Node] = []
    try:
        for _ in range(shards):
            nodes.append(_start(tmp, cluster=True))
        for node, (lo, hi) in zip(nodes, even_split(shards), strict=True):
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        for node in nodes[1:]:
            nodes[0].client().execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
        deadline = time.monotonic() + 30
        while True:
            infos = [n.client().execute_command("CLUSTER", "INFO") for n in nodes]
            text = [i.decode() if isinstance(i, bytes) else str(i) for i in infos]
            if all("cluster_state:ok" in t and f"cluster_known_nodes:{shards}" in t for t in text):
                return nodes
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not converge: {text}")
            time.sleep(0.1)
    except BaseException:
        _stop(nodes)
        raise


def _targets(nodes: list[Node], cluster: bool) -> list[TargetShard]:
    if not cluster:
        return [TargetShard("127.0.0.1", nodes[0].port)]
    return [TargetShard("127.0.0.1", n.port, [r]) for n, r in zip(nodes, even_split(len(nodes)), strict=True)]


# -- source dataset --------------------------------------------------------------------------


def _populate(c: redis.Redis) -> None:
    rng = random.Random(7)
    pipe = c.pipeline(transaction=False)
    for i in range(1500):
        pipe.set(f"str:{i}", rng.randbytes(rng.randint(1, 300)))
    for i in range(200):
        pipe.set(f"ttl:{i}", f"v{i}", px=3_600_000 + i)
    pipe.set(b"bin:\x00\xff{", b"\x00binary")
    pipe.set("big:string", rng.randbytes(300_000))  # larger than the test batch: sent alone
    for i in range(50):
        pipe.hset(f"hash:{i}", mapping={f"f{j}": f"v{j}" for j in range(5)})
        pipe.rpush(f"list:{i}", *[f"e{j}" for j in range(8)])
        pipe.sadd(f"iset:{i}", *range(10))
        pipe.sadd(f"set:{i}", *[f"m{j}" for j in range(6)])
        pipe.zadd(f"zset:{i}", {f"m{j}": j * 1.5 for j in range(7)})
    # Hash-table encodings (beyond the listpack/intset limits).
    pipe.hset("bighash", mapping={f"field:{j}": rng.randbytes(20) for j in range(600)})
    pipe.sadd("bigset", *[f"member:{j}" for j in range(700)])
    pipe.zadd("bigzset", {f"member:{j}": j for j in range(300)})
    pipe.rpush("biglist", *[rng.randbytes(50) for _ in range(3000)])
    pipe.set("{user1}:a", "A")
    pipe.set("{user1}:b", "B")
    pipe.hset("{user1}:profile", "name", "one")
    pipe.execute()
    for i in range(30):
        c.xadd("stream:1", {"n": i})
    c.xgroup_create("stream:1", "grp", id="0")
    c.xreadgroup("grp", "consumer-a", {"stream:1": ">"}, count=10)
    c.expire("hash:3", 7200)
    c1 = redis.Redis(port=c.connection_pool.connection_kwargs["port"], db=1)
    c1.set("db1:key", "in db one")
    c1.rpush("db1:list", "x", "y")
    c1.close()


def _dump_entries(port: int) -> list[RestoreEntry]:
    entries: list[RestoreEntry] = []
    for db in (0, 1):
        c = redis.Redis(port=port, db=db, socket_timeout=30)
        keys = sorted(c.scan_iter(count=1000))
        pipe = c.pipeline(transaction=False)
        for k in keys:
            pipe.dump(k)
            pipe.pttl(k)
        replies = pipe.execute()
        now = int(time.time() * 1000)
        for k, payload, pttl in zip(keys, replies[::2], replies[1::2], strict=True):
            entries.append(RestoreEntry(db, k, payload, now + pttl if pttl > 0 else None))
        c.close()
    return entries


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, list[RestoreEntry]]]:
    node = _start(tmp_path_factory.mktemp("source"))
    try:
        _populate(node.client())
        yield node, _dump_entries(node.port)
    finally:
        _stop([node])


def _db0(entries: list[RestoreEntry]) -> list[RestoreEntry]:
    return [e for e in entries if e.db == 0]


# -- tests -----------------------------------------------------------------------------------


def test_standalone_restore_is_identical(tmp_path: Path, source: tuple[Node, list[RestoreEntry]]) -> None:
    src, entries = source
    assert {e.db for e in entries} == {0, 1}
    past = RestoreEntry(0, b"already:expired", entries[0].payload, int(time.time() * 1000) - 1000)
    target = _start(tmp_path)
    try:
        targets = _targets([target], cluster=False)
        seen: list[tuple[int, int]] = []
        result = load_entries(
            [*entries, past],
            targets,
            cluster_mode=False,
            batch_bytes=64 << 10,  # small batches: many round trips plus the send-alone path
            batch_keys=100,
            progress=lambda n, x: seen.append((n, x)),
            progress_every=500,
        )
        assert result.keys_loaded == len(entries)
        assert result.keys_expired_skipped == 1
        assert result.targets[0].keys_with_ttl == sum(e.expire_ms is not None for e in entries)
        assert result.targets[0].batches > 10
        assert seen[-1] == (len(entries) + 1, 1)
        assert cache_digest([("127.0.0.1", target.port)]) == cache_digest([("127.0.0.1", src.port)])
        assert target.client().exists("already:expired") == 0
        assert target.client(1).get("db1:key") == b"in db one"
        # Keys with TTL keep their expiry.
        assert 0 < target.client().pttl("ttl:5") <= 3_600_005
        report = _verify_all(targets, result, entries)
        assert report["SampledKeys"] == len(entries)
        assert report["Mismatches"] == []
        assert report["KeyCounts"] == [
            {"Target": targets[0].address, "Expected": len(entries), "Actual": len(entries)}
        ]

        # Verification catches a key that is gone and a value that differs.
        target.client().delete("str:10")
        target.client().set("str:11", "tampered")
        with pytest.raises(RestoreFailed) as err:
            verify_restore(
                targets,
                expected_keys_per_target=result.keys_per_target,
                samples=[(e.db, e.key, e.payload) for e in entries],
                sample_limit=len(entries),
            )
        problems = {(m["Reason"], m.get("Key")) for m in err.value.details["Mismatches"]}
        assert ("Missing", "str:10") in problems
        assert ("ValueDiffers", "str:11") in problems
        assert ("KeyCount", None) in problems
    finally:
        _stop([target])


def test_a_sample_the_target_holds_in_another_encoding_is_counted_not_a_mismatch(tmp_path: Path) -> None:
    """A server loads a value into the encoding its own limits say (an older RDB's ziplist as a
    listpack; here a hashtable where the target keeps a listpack): the type is compared, not the bytes."""
    source, target = _start(tmp_path / "source"), _start(tmp_path / "target")
    try:
        source.client().config_set("hash-max-listpack-entries", 0)  # a hashtable, type byte 4
        for node in (source, target):
            node.client().hset("h", mapping={f"f{i}": i for i in range(10)})  # the target's: a listpack
            node.client().set("s", "a string")
        hashtable, string = source.client().dump("h"), source.client().dump("s")
        assert hashtable[0] == 4 and target.client().dump("h")[0] == 16
        shard = [TargetShard("127.0.0.1", target.port)]
        report = verify_restore(shard, expected_keys_per_target=[2], samples=[(0, b"h", hashtable), (0, b"s", string)])
        assert report["Mismatches"] == [] and report["SampledKeys"] == 2 and report["SampledReEncoded"] == 1
        # Another type under the key is still a mismatch.
        with pytest.raises(RestoreFailed) as err:
            verify_restore(shard, expected_keys_per_target=[2], samples=[(0, b"h", string)])
        assert [m["Reason"] for m in err.value.details["Mismatches"]] == ["ValueDiffers"]
    finally:
        _stop([source, target])


@pytest.mark.parametrize("shards", [3, 2])
def test_cluster_restore_routes_by_slot(
    tmp_path: Path, source: tuple[Node, list[RestoreEntry]], shards: int
) -> None:
    _, all_entries = source
    entries = _db0(all_entries)
    # The source holds db 1 as well; compare against a db-0-only copy of it.
    src_db0 = _start(tmp_path)
    nodes: list[Node] = []
    try:
        nodes = _make_cluster(tmp_path, shards)
        load_entries(entries, _targets([src_db0], cluster=False), cluster_mode=False)
        targets = _targets(nodes, cluster=True)
        result = load_entries(entries, targets, cluster_mode=True, batch_keys=200)
        assert result.keys_loaded == len(entries)
        assert sum(n.client().dbsize() for n in nodes) == len(entries)
        assert all(k > 0 for k in result.keys_per_target)

        expected = {e.key: e.payload for e in entries}
        for node, (lo, hi) in zip(nodes, even_split(shards), strict=True):
            c = node.client()
            keys = list(c.scan_iter(count=1000))
            assert len(keys) == c.dbsize()
            for k in keys:
                slot = c.execute_command("CLUSTER", "KEYSLOT", k)
                assert slot == key_slot(k) and lo <= slot <= hi
            pipe = c.pipeline(transaction=False)
            for k in keys:
                pipe.dump(k)
            unordered = []
            for k, dumped in zip(keys, pipe.execute(), strict=True):
                if dumped[0] in (2, 4):  # hash-table sets/hashes: order follows the hash seed
                    assert len(dumped) == len(expected[k]) and dumped[0] == expected[k][0]
                    unordered.append(k)
                else:
                    assert dumped == expected[k], k
            if unordered:  # order-independent per-key digest, target vs source
                digest = ("DEBUG", "DIGEST-VALUE", *unordered)
                assert c.execute_command(*digest) == src_db0.client().execute_command(*digest)
        tag_slot = key_slot(b"user1")
        owner = next(n for n, (lo, hi) in zip(nodes, even_split(shards), strict=True) if lo <= tag_slot <= hi)
        assert owner.client().execute_command("CLUSTER", "COUNTKEYSINSLOT", tag_slot) == 3
        assert owner.client().mget("{user1}:a", "{user1}:b") == [b"A", b"B"]
        # Whole-dataset equality, independent of how keys are spread over shards.
        node_digests = cache_digest([("127.0.0.1", n.port) for n in nodes])
        assert len(set(node_digests)) == shards
        assert combined_digest(node_digests) == cache_digest([("127.0.0.1", src_db0.port)])[0]
        report = _verify_all(targets, result, entries)
        assert report["Mismatches"] == [] and report["SampledKeys"] == len(entries)
        assert [k["Actual"] for k in report["KeyCounts"]] == result.keys_per_target

        # Multi-db snapshots cannot go into a cluster.
        with pytest.raises(InvalidParameterCombination):
            load_entries(all_entries, targets, cluster_mode=True)
    finally:
        _stop([*nodes, src_db0])


def test_error_reply_names_the_key(tmp_path: Path, source: tuple[Node, list[RestoreEntry]]) -> None:
    _, entries = source
    good = [e for e in _db0(entries) if e.key.startswith(b"str:")][:50]
    bad_payload = bytearray(good[0].payload)
    bad_payload[-1] ^= 0xFF  # break the CRC64
    bad = RestoreEntry(0, b"broken:key", bytes(bad_payload), None)
    target = _start(tmp_path)
    try:
        targets = _targets([target], cluster=False)
        with pytest.raises(RestoreFailed) as err:
            load_entries(
                [*good[:20], bad, *good[20:]], targets, cluster_mode=False, batch_keys=7, max_inflight=3
            )
        assert "broken:key" in str(err.value)
        assert err.value.details["Key"] == "broken:key"
        assert "checksum" in err.value.details["ServerMessage"]
        assert err.value.details["FailedCount"] == 1
        # Direct ShardLoader use: the failure surfaces at flush() with stats of what loaded.
        with ShardLoader("127.0.0.1", target.port) as loader:
            for e in good:
                loader.add(e)
            stats = loader.flush()
        assert stats.keys_loaded == len(good) and stats.bytes_sent > sum(len(e.payload) for e in good)
    finally:
        _stop([target])


def test_functions_and_auth(tmp_path: Path, source: tuple[Node, list[RestoreEntry]]) -> None:
    _, entries = source
    nodes: list[Node] = []
    try:
        nodes.append(_start(tmp_path))
        nodes.append(_start(tmp_path))
        nodes[1].client().config_set("requirepass", "s3cret")
        code = b"#!lua name=cvlib\nredis.register_function('cv_hello', function() return 'hi' end)"
        targets = [TargetShard("127.0.0.1", nodes[0].port), TargetShard("127.0.0.1", nodes[1].port,
                                                                        password="s3cret")]
        assert load_functions([code], targets) == 2
        assert load_functions([code], targets) == 2  # REPLACE: idempotent
        assert nodes[0].client().fcall("cv_hello", 0) == b"hi"
        with redis.Redis(port=nodes[1].port, password="s3cret") as c:
            assert c.fcall("cv_hello", 0) == b"hi"
        with pytest.raises(RestoreFailed, match="cvbad"):
            load_functions([b"#!lua name=cvbad\nthis is not lua"], targets[:1])
        # AUTH on the raw loader, then a wrong password is refused with a clear error.
        result = load_entries(_db0(entries)[:100], targets[1:], cluster_mode=False)
        assert result.keys_loaded == 100
        with pytest.raises(RestoreFailed, match="Authentication"):
            ShardLoader("127.0.0.1", nodes[1].port, password="wrong")
    finally:
        _stop(nodes)


def test_rdb_file_streams_into_target(tmp_path: Path, source: tuple[Node, list[RestoreEntry]]) -> None:
    """The real seam: SAVE on the source, read the RDB with cachevault.rdb.reader, RESTORE it."""
    src, entries = source
    sc = src.client()
    sc.function_load("#!lua name=srclib\nredis.register_function('src_fn', function() return 7 end)", True)
    sc.save()
    rdb_path = Path(sc.config_get("dir")["dir"]) / sc.config_get("dbfilename")["dbfilename"]
    target = _start(tmp_path)
    try:
        targets = _targets([target], cluster=False)
        functions: list[bytes] = []
        with RdbFile(rdb_path) as rdb:
            result = load_entries(
                entries_from_rdb(rdb, rdb.version, functions=functions), targets, cluster_mode=False
            )
        assert result.keys_loaded == len(entries)
        assert len(functions) == 1
        load_functions(functions, targets)
        assert target.client().fcall("src_fn", 0) == 7
        assert cache_digest([("127.0.0.1", target.port)]) == cache_digest([("127.0.0.1", src.port)])
    finally:
        _stop([target])
