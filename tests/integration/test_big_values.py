"""Values of any size over the network loader: 1 B to 64 MB of every type, resharded.

A value bigger than the socket buffers (a few MB on loopback) is sent over many rounds;
a loader that waited for replies while the target still waited for the rest of such a
RESTORE stalled until its timeout (issue 11). Here every type reaches 64 MB, plus a
100k-field hash, and the same data goes 1 -> 3 shards, then those 3 shard RDBs -> 2 and
-> 4 shards (load_rdb_file, the ShardLoad path), DEBUG DIGEST equal every time.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cachevault.nodes.credentials import Tls
from cachevault.nodes.slots import parse_slot_ranges
from cachevault.restore.load import TargetShard, load_rdb_file
from cachevault.restore.verify import cache_digest, combined_digest
from cachevault_tools.local.fleet import Fleet
from cachevault_tools.local.redis_process import start_node

from tests.tls_fixtures import make_tls_files

SIZES = (1, 100, 64 << 10, 1 << 20, 5 << 20, 64 << 20)
ELEMENT = 16 << 10  # element size of the collections above one element
TIMEOUT = 30.0  # a stall fails fast instead of after the default 300 s


class _Bytes:
    """Distinct incompressible byte strings cut from one random pool (cheap to make)."""

    def __init__(self, pool_size: int) -> None:
        self._pool = os.urandom(pool_size)
        self._at = 0

    def take(self, n: int) -> bytes:
        start = self._at % (len(self._pool) - n + 1)
        self._at += 4099
        return self._pool[start : start + n]


def _elements(total: int, rnd: _Bytes) -> list[bytes]:
    """Distinct members adding up to ``total`` bytes (one member when it fits in ELEMENT)."""
    if total <= ELEMENT:
        return [rnd.take(total)]
    return [b"%08d" % i + rnd.take(ELEMENT - 8) for i in range(total // ELEMENT)]


def _populate(client: redis.Redis) -> int:
    """Every type at every size in SIZES, plus a 100k-field hash; returns the key count."""
    rnd = _Bytes(80 << 20)
    keys = 0
    for size in SIZES:
        client.set(f"string:{size}", rnd.take(size))
        members = _elements(size, rnd)
        pipe = client.pipeline(transaction=False)
        for at in range(0, len(members), 256):
            chunk = members[at : at + 256]
            pipe.rpush(f"list:{size}", *chunk)
            pipe.sadd(f"set:{size}", *chunk)
            pipe.zadd(f"zset:{size}", {m: i for i, m in enumerate(chunk, at)})
            pipe.hset(f"hash:{size}", mapping={m[:64] + b"%d" % i: m for i, m in enumerate(chunk, at)})
            for m in chunk:
                pipe.xadd(f"stream:{size}", {b"f": m})
            pipe.execute()
        keys += 6
    pipe = client.pipeline(transaction=False)
    fields = {b"field:%06d" % i: b"value:%d" % i for i in range(100_000)}
    for at in range(0, 100_000, 10_000):
        part = dict(list(fields.items())[at : at + 10_000])
        pipe.hset("hash:100k-fields", mapping=part)
    pipe.execute()
    return keys + 1


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, int]]:
    """The source RDB (one standalone node), its DEBUG DIGEST and key count."""
    work = tmp_path_factory.mktemp("big-values")
    node = start_node(work / "src", config={"rdbcompression": "no"})
    try:
        client = node.client(timeout=120)
        keys = _populate(client)
        assert client.dbsize() == keys
        digest = cache_digest([node.endpoint])[0]
        client.save()
        rdb = work / "source.rdb"
        (node.data_dir / "dump.rdb").rename(rdb)
    finally:
        node.stop()
    yield rdb, digest, keys


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("big-values-fleet"))
    yield fleet
    fleet.stop_all()


def _restore(fleet: Fleet, name: str, rdbs: list[Path], shards: int) -> tuple[list[TargetShard], int]:
    """A fresh ``shards``-shard cluster loaded from ``rdbs``; its targets and keys loaded."""
    layout = fleet.create_cache(name, cluster_mode=True, num_shards=shards, replicas_per_shard=0)
    targets = [TargetShard(s.primary.host, s.primary.port, parse_slot_ranges(s.slots or "")) for s in layout.shards]
    loaded = 0
    for rdb in rdbs:
        result = load_rdb_file(rdb, targets, cluster_mode=True, timeout=TIMEOUT)
        loaded += result.keys_loaded
    return targets, loaded


@pytest.fixture(scope="module")
def three_shards(fleet: Fleet, source: tuple[Path, str, int]) -> tuple[list[Path], str, int]:
    """1 -> 3: the source restored into 3 shards; each shard saved as an RDB of its own."""
    rdb, _, _ = source
    targets, loaded = _restore(fleet, "three", [rdb], 3)
    digest = combined_digest(cache_digest(targets))
    rdbs: list[Path] = []
    for i, t in enumerate(targets):
        client = redis.Redis(host=t.host, port=t.port, socket_timeout=120)
        client.save()
        shard_rdb = rdb.parent / f"shard-{i}.rdb"
        shutil.move(Path(client.config_get("dir")["dir"]) / "dump.rdb", shard_rdb)
        client.close()
        rdbs.append(shard_rdb)
    fleet.destroy_cache("three")
    return rdbs, digest, loaded


def test_one_to_three_shards(source: tuple[Path, str, int], three_shards: tuple[list[Path], str, int]) -> None:
    _, digest, keys = source
    _, three_digest, loaded = three_shards
    assert loaded == keys
    assert three_digest == digest


@pytest.mark.parametrize("shards", [2, 4])
def test_three_shards_to(
    shards: int, fleet: Fleet, source: tuple[Path, str, int], three_shards: tuple[list[Path], str, int]
) -> None:
    _, digest, keys = source
    rdbs, _, _ = three_shards
    name = f"to-{shards}"
    targets, loaded = _restore(fleet, name, rdbs, shards)
    try:
        assert loaded == keys
        assert combined_digest(cache_digest(targets)) == digest
    finally:
        fleet.destroy_cache(name)


def test_big_values_over_tls_with_auth(tmp_path: Path) -> None:
    """The same non-blocking loop over an SSLSocket (decrypted bytes poll() cannot see)."""
    tls = make_tls_files(tmp_path / "tls")
    src = start_node(tmp_path / "src", config={"rdbcompression": "no"})
    dst = start_node(tmp_path / "dst", tls=tls.fleet(), password="big-secret")
    try:
        client = src.client(timeout=60)
        rnd = _Bytes(16 << 20)
        client.set("string:12m", rnd.take(12 << 20))
        client.hset("hash:6m", mapping={b"f%06d" % i: m for i, m in enumerate(_elements(6 << 20, rnd))})
        client.mset({f"small:{i}": rnd.take(i % 500) for i in range(3000)})
        digest = cache_digest([src.endpoint])[0]
        client.save()
        rdb = tmp_path / "src.rdb"
        (src.data_dir / "dump.rdb").rename(rdb)
        target = TargetShard(dst.host, dst.port, password="big-secret", tls=Tls(ca_file=tls.ca_file))
        result = load_rdb_file(rdb, [target], cluster_mode=False, timeout=TIMEOUT)
        assert result.keys_loaded == 3002
        assert cache_digest([target])[0] == digest
    finally:
        src.stop()
        dst.stop()
