"""rdb.cut: a node's slots of one or more RDBs as a new RDB, loaded by a real redis-server."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from cachevault.core.errors import RdbFormatError
from cachevault.nodes.slots import even_split, key_slot
from cachevault.rdb.cut import (
    RdbWriter,
    Sampling,
    cut,
    cut_routed,
    encode_len,
    library_name,
    owned_slots,
    route_slots,
)
from cachevault.rdb.dump_payload import restore_payload
from cachevault.rdb.encoding import read_len
from cachevault.rdb.reader import RdbFile, RdbStream, scan_rdb
from rdbgen import enc_str, ms_time, rdb_file, redis_server

LIBRARY = "#!lua name=cutlib\nredis.register_function('cut_get', function(keys) return redis.call('GET', keys[1]) end)"


def _fill(client, prefix: str) -> None:
    for i in range(400):
        client.set(f"{prefix}:s:{i}", f"v{i}" * (i % 7))
        client.set(f"{prefix}:n:{i}", i)  # integer-encoded
    client.set(f"{prefix}:big", b"x" * (3 << 20))  # runs past a stream window
    client.hset(f"{prefix}:h", mapping={f"f{i}": i for i in range(300)})
    client.rpush(f"{prefix}:l", *range(200))
    client.sadd(f"{prefix}:set", *range(100))
    client.zadd(f"{prefix}:z", {f"m{i}": i for i in range(150)})
    client.xadd(f"{prefix}:x", {"a": "1"})
    for i in range(50):
        client.set(f"{{{prefix}-tag}}:k{i}", i)  # one slot for all of them
        client.set(f"{prefix}:ttl:{i}", i, ex=3600)


def _saved(server) -> Path:
    server.client.save()
    return server.dir / "dump.rdb"


def _cut_to(path: Path, sources: list[Path], ranges: list[tuple[int, int]], **kwargs):
    out = io.BytesIO()
    writer = RdbWriter(out.write, 10)
    stats = cut([lambda p=p: RdbFile(p) for p in sources], owned_slots(ranges), writer, **kwargs)
    stats.bytes_written = writer.close()
    path.write_bytes(out.getvalue())
    return stats


def test_three_cuts_load_into_redis_and_together_give_back_every_key(tmp_path: Path) -> None:
    with redis_server(tmp_path / "src") as src:
        _fill(src.client, "a")
        src.client.function_load(LIBRARY)
        source = _saved(src)
        keys = sorted(src.client.keys("*"))
        digests = {k: src.client.execute_command("DEBUG", "DIGEST-VALUE", k)[0] for k in keys}
        ttls = {k: src.client.pexpiretime(k) for k in keys}
    seen: list[bytes] = []
    for part, (start, end) in enumerate(even_split(3)):
        path = tmp_path / f"cut{part}" / "dump.rdb"
        path.parent.mkdir()
        stats = _cut_to(path, [source], [(start, end)])
        assert stats.functions == 1 and stats.keys_expired_skipped == 0
        assert stats.bytes_written == path.stat().st_size
        summary = scan_rdb(path)  # a whole RDB: its own CRC64 trailer checks
        assert summary.checksum_ok and summary.functions == 1
        with redis_server(path.parent) as node:  # loads dump.rdb at start-up
            mine = sorted(node.client.keys("*"))
            assert len(mine) == stats.keys == summary.total_keys
            assert all(start <= key_slot(k) <= end for k in mine)
            for k in mine:
                assert node.client.execute_command("DEBUG", "DIGEST-VALUE", k)[0] == digests[k]
                assert node.client.pexpiretime(k) == ttls[k]
            assert stats.keys_with_ttl == sum(1 for k in mine if ttls[k] > 0)
            assert node.client.function_list()[0][1] == b"cutlib"  # [library_name, name, ...]
            string = next(k for k in mine if b":s:" in k)
            assert node.client.fcall("cut_get", 1, string) == node.client.get(string)
        assert stats.per_source == [(len(mine), len(keys))]
        assert stats.keys + stats.keys_elsewhere == len(keys)
        seen += mine
    assert sorted(seen) == keys


def test_several_sources_streamed_one_library_each(tmp_path: Path) -> None:
    sources = []
    for name in ("one", "two"):
        with redis_server(tmp_path / name) as server:
            _fill(server.client, name)
            server.client.function_load(LIBRARY)  # every shard of a cluster holds the same libraries
            sources.append(_saved(server))
    out = io.BytesIO()
    writer = RdbWriter(out.write, 10)

    class Source:  # a ByteSource over a file, read in small pieces
        def __init__(self, path: Path) -> None:
            self.fh, self.size = open(path, "rb"), path.stat().st_size  # noqa: SIM115 (closed by close())

        def read(self, n: int) -> bytes:
            return self.fh.read(n)

        def close(self) -> None:
            self.fh.close()

    stats = cut([lambda p=p: RdbStream(Source(p), window=1 << 16) for p in sources], owned_slots([(0, 16383)]), writer)
    writer.close()
    path = tmp_path / "both" / "dump.rdb"
    path.parent.mkdir()
    path.write_bytes(out.getvalue())
    assert stats.functions == 1
    assert stats.per_source == [(scan_rdb(p).total_keys,) * 2 for p in sources]
    with redis_server(path.parent) as node:
        assert node.client.dbsize() == stats.keys == sum(mine for mine, _ in stats.per_source)
        assert len(node.client.function_list()) == 1


def test_one_routed_pass_writes_each_node_what_its_own_cut_would(tmp_path: Path) -> None:
    sources = []
    for name in ("a", "b"):
        with redis_server(tmp_path / name) as src:
            _fill(src.client, name)
            src.client.function_load(LIBRARY)
            sources.append(_saved(src))
    ranges = even_split(3)
    outs = [io.BytesIO() for _ in ranges]
    writers = [RdbWriter(out.write, 10, flush_bytes=4096) for out in outs]  # many small sends
    now = int(time.time() * 1000)
    routed = cut_routed([lambda p=p: RdbFile(p) for p in sources], route_slots([[r] for r in ranges]), writers,
                        now_ms=now)  # fmt: skip
    for writer, stats in zip(writers, routed, strict=True):
        stats.bytes_written = writer.close()
    every = [total for _, total in routed[0].per_source]
    for part, (r, out, stats) in enumerate(zip(ranges, outs, routed, strict=True)):
        alone = _cut_to(tmp_path / f"alone{part}.rdb", sources, [r], now_ms=now)
        assert out.getvalue() == (tmp_path / f"alone{part}.rdb").read_bytes()  # byte for byte
        assert (stats.keys, stats.keys_elsewhere, stats.functions, stats.per_source) == (
            alone.keys, alone.keys_elsewhere, 1, alone.per_source)  # fmt: skip
    for i, total in enumerate(every):  # every key of every source went to exactly one node
        assert sum(stats.per_source[i][0] for stats in routed) == total > 0


def test_samples_are_the_first_key_of_each_source_then_one_in_n_as_dump_gives_them(tmp_path: Path) -> None:
    with redis_server(tmp_path / "src") as src:
        _fill(src.client, "a")
        source = _saved(src)
        keys = src.client.dbsize()
        version = RdbFile(source).version
        samples: list[tuple[int, bytes, bytes, int | None]] = []

        def keep(db: int, key: bytes, type_byte: int, value: memoryview, expire_ms: int | None) -> None:
            samples.append((db, bytes(key), restore_payload(type_byte, value, version), expire_ms))

        def cut(every: list[int], per_source: int) -> None:
            writers = [RdbWriter(io.BytesIO().write, 10) for _ in range(3)]
            cut_routed([lambda: RdbFile(source)] * len(every), route_slots([[r] for r in even_split(3)]), writers,
                       sampling=Sampling(keep, every, per_source))  # fmt: skip

        cut([97, 97], 1000)
        # Each source from its first key: keys 1, 98, 195, ... of both.
        half = len(samples) // 2
        assert len(samples) == 2 * (1 + (keys - 1) // 97) and samples[:half] == samples[half:]
        for db, key, payload, expire_ms in samples:  # what Verify compares with the node
            assert db == 0 and src.client.dump(key) == payload
            assert expire_ms == (src.client.pexpiretime(key) if expire_ms is not None else None)

        # Each source's own spread, at most per_source of each: a count of 0 (unknown) samples the
        # first keys, and a source sampled to its cap leaves the next one its share.
        samples.clear()
        cut([0, keys // 5, 1], 5)
        firsts, spread, last = samples[:5], samples[5:10], samples[10:]
        assert len(samples) == 15 and firsts == last  # keys 1-5 of the first and the third source
        assert spread[0] == firsts[0] and spread[1] != firsts[1]  # keys 1, 1 + keys // 5, ...


def test_keys_expired_before_the_cut_are_left_out_and_counted(tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    body = (
        b"\xfe\x00"
        + b"\xfc" + ms_time(now - 1000) + b"\x00" + enc_str(b"gone") + enc_str(b"v")
        + b"\xfc" + ms_time(now + 3_600_000) + b"\x00" + enc_str(b"stays") + enc_str(b"v")
        + b"\xf9\x07\x00" + enc_str(b"lfu") + enc_str(b"v")
    )  # fmt: skip
    source = tmp_path / "src.rdb"
    source.write_bytes(rdb_file(10, body))
    path = tmp_path / "cut" / "dump.rdb"
    path.parent.mkdir()
    stats = _cut_to(path, [source], [(0, 16383)], now_ms=now)
    assert (stats.keys, stats.keys_with_ttl, stats.keys_expired_skipped, stats.per_source) == (2, 1, 1, [(3, 3)])
    with redis_server(path.parent, "--maxmemory-policy", "allkeys-lfu") as node:
        assert sorted(node.client.keys("*")) == [b"lfu", b"stays"]
        assert node.client.object("freq", "lfu") == 7  # the LFU opcode went along


def test_a_key_outside_database_0_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "src.rdb"
    source.write_bytes(rdb_file(10, b"\xfe\x02" + b"\x00" + enc_str(b"k") + enc_str(b"v")))
    with pytest.raises(RdbFormatError, match="database 2"):
        cut([lambda: RdbFile(source)], owned_slots([(0, 16383)]), RdbWriter(io.BytesIO().write, 10))


@pytest.mark.parametrize("n", [0, 63, 64, 16383, 16384, 2**32 - 1, 2**32])
def test_lengths_encode_as_the_reader_reads_them(n: int) -> None:
    data = encode_len(n) + b"!"
    assert read_len(data, 0, len(data)) == (n, len(data) - 1)


def test_library_name() -> None:
    assert library_name(LIBRARY.encode()) == "cutlib"
