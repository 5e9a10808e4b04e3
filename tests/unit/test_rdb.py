"""RdbFile against real redis-server 7.0.15 dumps, hand-built v9..v12 files and a Valkey 8 fixture."""

from __future__ import annotations

import json
import random
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import redis
from cachevault.core.errors import RdbFormatError
from cachevault.rdb import encoding as f
from cachevault.rdb.dump_payload import restore_payload
from cachevault.rdb.reader import RdbAux, RdbFile, RdbFunction, RdbKey, RdbModuleSkipped, scan_rdb
from rdbgen import (
    RedisServer,
    enc_int_str,
    enc_len,
    enc_lzf_literal,
    enc_str,
    ms_time,
    rdb_file,
    redis_server,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rdb"
FUNCTION_CODE = "#!lua name=mylib\n redis.register_function('myfunc', function(keys, args) return 1 end)"


def populate(server: RedisServer) -> dict[int, int]:
    """Every type/encoding Redis 7.0 writes, in dbs 0, 1 and 5. Returns key count per db."""
    rnd = random.Random(7)
    c0, c1, c5 = server.db(0), server.db(1), server.db(5)
    p = c0.pipeline(transaction=False)
    p.set("str:raw", "hello world")
    p.set("str:int", "12345")
    p.set("str:negint", "-7000000")
    p.set("str:bigint", str(2**40))
    p.set("str:lzf", "abcdefgh" * 2000)  # long and compressible
    p.set("k" * 120 + ":lzf-key", "v")  # the key itself gets LZF-compressed
    p.set("12345678", "int-encoded key")
    p.set("str:bin", bytes(rnd.randrange(256) for _ in range(300)))
    p.set("str:empty", "")
    p.rpush("list:small", *[f"e{i}" for i in range(10)], 42, -1)
    p.rpush("list:large", *[f"element-{i}-{'x' * (i % 50)}" for i in range(5000)])
    p.sadd("set:intset", *range(0, 400, 3))
    p.sadd("set:ht", *[f"member-{i}" for i in range(300)])
    p.sadd("set:small-strings", "a", "b", "c")
    p.zadd("zset:lp", {"a": 1.5, "b": -2.25, "c": float("inf"), "d": float("-inf"), "e": 0})
    p.zadd("zset:skip", {f"m{i}": i / 7 for i in range(300)} | {"pinf": float("inf"), "ninf": float("-inf")})
    p.hset("hash:lp", mapping={"f1": "v1", "f2": "22", "f3": "x" * 30})
    p.hset("hash:ht", mapping={f"field{i}": f"value{i}" * 3 for i in range(600)})
    p.hset("hash:bigval", mapping={"big": "y" * 5000})
    for i in range(250):  # > stream-node-max-entries (100): several listpack nodes
        p.xadd("stream:big", {"n": i, "payload": "p" * (i % 13)}, id=f"{1000 + i}-0")
    for i in range(8):
        p.xadd("stream:groups", {"field": f"v{i}", "other": i}, id=f"{2000 + i}-{i}")
    p.xdel("stream:groups", "2002-2", "2005-5")
    p.xdel("stream:big", "1001-0", "1100-0")
    p.xgroup_create("stream:groups", "g1", id="0")
    p.xgroup_create("stream:groups", "g2", id="$")
    p.xreadgroup("g1", "alice", {"stream:groups": ">"}, count=3)
    p.xreadgroup("g1", "bob", {"stream:groups": ">"}, count=2)
    p.xgroup_createconsumer("stream:groups", "g1", "carol")
    p.xack("stream:groups", "g1", "2000-0")
    p.xadd("stream:empty", {"a": 1}, id="5-5")
    p.xdel("stream:empty", "5-5")
    now = int(time.time() * 1000)
    for i in range(20):
        p.set(f"ttl:{i}", i)
        p.pexpireat(f"ttl:{i}", now + 3_600_000 + i * 1000)
    p.pexpire("hash:lp", 7_200_000)
    p.pexpire("stream:groups", 9_000_000)
    p.execute()
    for c, prefix, n in ((c1, "db1", 30), (c5, "db5", 7)):
        q = c.pipeline(transaction=False)
        for i in range(n):
            q.set(f"{prefix}:s{i}", f"value {i}")
        q.rpush(f"{prefix}:list", "a", "b")
        q.hset(f"{prefix}:hash", "f", "v")
        q.pexpire(f"{prefix}:s0", 5_000_000)
        q.execute()
    # Plain (non-listpack) quicklist nodes: elements over the packed threshold.
    c0.execute_command("DEBUG", "QUICKLIST-PACKED-THRESHOLD", "1000")
    c0.rpush("list:plain", "small", "z" * 3000, "tiny", "w" * 2000)
    c0.function_load(FUNCTION_CODE)
    return {db: server.db(db).dbsize() for db in (0, 1, 5)}


def restore_into(target: RedisServer, path: Path) -> tuple[RdbFile, list[RdbKey]]:
    keys: list[RdbKey] = []
    with RdbFile(path) as rdb:
        pipes: dict[int, redis.client.Pipeline] = {}
        for item in rdb:
            if isinstance(item, RdbKey):
                pipe = pipes.get(item.db)
                if pipe is None:
                    pipe = pipes[item.db] = target.db(item.db).pipeline(transaction=False)
                payload = restore_payload(item.type_byte, item.value, rdb.version)
                if item.expire_ms is not None:
                    pipe.execute_command("RESTORE", item.key, item.expire_ms, payload, "REPLACE", "ABSTTL")
                else:
                    pipe.execute_command("RESTORE", item.key, 0, payload, "REPLACE")
                keys.append(item)
            elif isinstance(item, RdbFunction):
                target.client.execute_command("FUNCTION", "LOAD", "REPLACE", item.code)
        for pipe in pipes.values():
            assert all(r in (b"OK", True) for r in pipe.execute())
    return rdb, keys


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory):
    with redis_server(tmp_path_factory.mktemp("src"), "--maxmemory-policy", "allkeys-lfu") as server:
        counts = populate(server)
        yield server, counts


@pytest.mark.parametrize("compression", ["yes", "no"])
def test_roundtrip_real_redis(source, tmp_path: Path, compression: str) -> None:
    src, counts = source
    src.client.config_set("rdbcompression", compression)
    dump = src.save()
    path = tmp_path / "dump.rdb"
    shutil.copy(dump, path)
    with redis_server(tmp_path / "dst") as dst:
        rdb, keys = restore_into(dst, path)
        assert rdb.version == 10
        assert rdb.complete and rdb.checksum_ok and rdb.checksum
        assert rdb.aux[b"redis-ver"] == b"7.0.15"
        assert rdb.functions == 1
        assert {db: s.keys for db, s in rdb.dbs.items()} == counts
        assert {db: s.resize_keys for db, s in rdb.dbs.items()} == counts
        for db in counts:
            assert dst.db(db).dbsize() == counts[db]
        assert dst.client.execute_command("DEBUG", "DIGEST") == src.client.execute_command("DEBUG", "DIGEST")
        assert dst.client.function_dump() == src.client.function_dump()
        full = ("XINFO", "STREAM", "stream:groups", "FULL")
        assert dst.client.execute_command(*full) == src.client.execute_command(*full)
        # TTLs restored as absolute times; FREQ carried by the LFU policy.
        for k in keys:
            if k.expire_ms is not None:
                assert abs(dst.db(k.db).pexpiretime(k.key) - k.expire_ms) <= 1
            assert k.freq is not None
        assert sum(k.expire_ms is not None for k in keys) == 20 + 2 + 2
        # Every raw value is byte-identical to what DUMP returns on the source.
        for k in keys:
            assert restore_payload(k.type_byte, k.value, 10) == src.db(k.db).dump(k.key), k.key
        types = {k.type_byte for k in keys}
        expected = {
            f.T_STRING, f.T_LIST_QUICKLIST_2, f.T_SET_INTSET, f.T_SET, f.T_ZSET_LISTPACK,
            f.T_ZSET_2, f.T_HASH_LISTPACK, f.T_HASH, f.T_STREAM_LISTPACKS_2,
        }  # fmt: skip
        assert types == expected
        names = {k.key for k in keys}
        assert b"k" * 120 + b":lzf-key" in names and b"12345678" in names
        del keys, k


def test_scan_summary_and_key_values(source, tmp_path: Path) -> None:
    src, counts = source
    src.client.config_set("rdbcompression", "yes")
    path = tmp_path / "d.rdb"
    shutil.copy(src.save(), path)
    summary = scan_rdb(path)
    assert summary.version == 10
    assert summary.keys_per_db == counts
    assert summary.functions == 1
    assert summary.checksum_ok
    assert summary.total_bytes == path.stat().st_size
    assert summary.expires_per_db == {0: 22, 1: 1, 5: 1}
    assert summary.module_keys_skipped == 0
    with RdbFile(path) as rdb:
        items = list(rdb)
        aux = [i for i in items if isinstance(i, RdbAux)]
        assert {a.name for a in aux} >= {b"redis-ver", b"redis-bits", b"ctime", b"used-mem", b"aof-base"}
        fn = [i for i in items if isinstance(i, RdbFunction)]
        assert [x.code.decode() for x in fn] == [FUNCTION_CODE]
        by_key = {(i.db, i.key): i for i in items if isinstance(i, RdbKey)}
        # The offset points at the type byte; the value lies between the key and the next record.
        raw = path.read_bytes()
        ordered = sorted(by_key.values(), key=lambda k: k.offset)
        for item, nxt in zip(ordered, [*ordered[1:], None], strict=True):
            assert raw[item.offset] == item.type_byte
            at = raw.find(bytes(item.value), item.offset + 2)
            assert item.offset + 2 <= at and at + len(item.value) <= (nxt.offset if nxt else len(raw))
        s = by_key[(0, b"str:raw")]
        assert bytes(s.value) == b"\x0bhello world"
        assert bytes(by_key[(0, b"str:int")].value) == b"\xc1" + struct.pack("<h", 12345)
        assert by_key[(0, b"str:lzf")].value[0] == 0xC3  # LZF-encoded value
        del by_key, ordered, items, s, item, nxt


def test_mmap_streaming_memory(tmp_path: Path) -> None:
    rnd = random.Random(1)
    with redis_server(tmp_path / "big") as server:
        pipe = server.client.pipeline(transaction=False)
        for i in range(2000):
            pipe.set(f"blob:{i}", rnd.randbytes(4000))  # incompressible: ~8 MB file
        pipe.execute()
        path = server.save()
    size = path.stat().st_size
    assert size > 7_000_000
    tracemalloc.start()
    try:
        total = count = 0
        with RdbFile(path) as rdb:
            for item in rdb:
                if isinstance(item, RdbKey):
                    total += len(item.value)
                    count += 1
                    item.value.release()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 2000 and total > 8_000_000
    assert peak < size / 20, f"peak {peak} for a {size}-byte file"


# -- corruption ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_dump(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    with redis_server(tmp_path_factory.mktemp("small")) as server:
        server.client.set("a", "b" * 100)
        server.client.hset("h", mapping={f"f{i}": i for i in range(200)})
        server.client.rpush("l", *range(100))
        server.client.xadd("s", {"x": 1})
        return server.save().read_bytes()


def _iterate(path: Path) -> int:
    n = 0
    with RdbFile(path) as rdb:
        for item in rdb:
            if isinstance(item, RdbKey):
                item.value.release()
            n += 1
    return n


@pytest.mark.parametrize("cut", [0.1, 0.3, 0.5, 0.7, 0.9, -9, -1])
def test_truncated(small_dump: bytes, tmp_path: Path, cut: float) -> None:
    n = int(len(small_dump) * cut) if cut > 0 else len(small_dump) + int(cut)
    path = tmp_path / "t.rdb"
    path.write_bytes(small_dump[:n])
    with pytest.raises(RdbFormatError, match=r"offset \d+") as err:
        _iterate(path)
    assert "truncated" in str(err.value)
    assert str(n) in str(err.value) or err.value.details["offset"] <= n


def test_flipped_byte(small_dump: bytes, tmp_path: Path) -> None:
    for at in (len(small_dump) // 3, len(small_dump) // 2, len(small_dump) - 20):
        data = bytearray(small_dump)
        data[at] ^= 0x5A
        path = tmp_path / f"flip{at}.rdb"
        path.write_bytes(bytes(data))
        with pytest.raises(RdbFormatError, match=r"offset \d+"):
            _iterate(path)


def test_bad_magic_and_version(tmp_path: Path) -> None:
    for data, msg in (
        (b"RADIS0010\xff" + bytes(8), "magic"),
        (b"REDIS0099\xff" + bytes(8), "version"),
        (b"REDIS", "header"),
    ):
        path = tmp_path / "m.rdb"
        path.write_bytes(data)
        with pytest.raises(RdbFormatError, match=msg):
            RdbFile(path)


def test_trailing_garbage(small_dump: bytes, tmp_path: Path) -> None:
    path = tmp_path / "g.rdb"
    path.write_bytes(small_dump + b"junk")
    with pytest.raises(RdbFormatError, match="after the RDB end"):
        _iterate(path)


# -- hand-built files for what Redis 7.0 does not write ----------------------------------------
def test_handmade_v12_module_and_opcodes(tmp_path: Path) -> None:
    mod_id = f.module_id("ReJSON-RL", 3)
    module_value = (
        enc_len(mod_id)
        + enc_len(f.MOD_UINT) + enc_len(70000)
        + enc_len(f.MOD_SINT) + enc_len(5)
        + enc_len(f.MOD_FLOAT) + struct.pack("<f", 1.5)
        + enc_len(f.MOD_DOUBLE) + struct.pack("<d", 2.5)
        + enc_len(f.MOD_STRING) + enc_str(b"{\"a\":1}")
        + enc_len(f.MOD_EOF)
    )  # fmt: skip
    listpack = b"\x07\x00\x00\x00\x00\x00\xff"  # opaque to the reader: one string
    hash_meta = ms_time(1_900_000_000_000) + enc_len(2) + enc_len(0) + enc_str(b"f") + enc_str(b"v")
    hash_meta += enc_len(5) + enc_str(b"g") + enc_int_str(77)
    values = {
        b"old-list": (f.T_LIST, enc_len(2) + enc_str(b"a") + enc_int_str(-3)),
        b"old-set": (f.T_SET, enc_len(1) + enc_str(b"m")),
        b"old-zset": (f.T_ZSET, enc_len(3) + enc_str(b"a") + b"\x031.5" + enc_str(b"b") + b"\xfe"
                      + enc_str(b"c") + b"\xfd"),
        b"old-hash": (f.T_HASH, enc_len(1) + enc_str(b"f") + enc_lzf_literal(b"L" * 70)),
        b"set-lp": (f.T_SET_LISTPACK, enc_str(listpack)),
        b"hash-meta": (f.T_HASH_METADATA, hash_meta),
        b"hash-meta-pre": (f.T_HASH_METADATA_PRE_GA, enc_len(1) + enc_len(123) + enc_str(b"f")
                           + enc_str(b"v")),
        b"hash-lpex": (f.T_HASH_LISTPACK_EX, ms_time(5) + enc_str(listpack)),
        b"hash-lpex-pre": (f.T_HASH_LISTPACK_EX_PRE_GA, enc_str(listpack)),
    }  # fmt: skip
    body = enc_str(b"redis-ver").join((b"\xfa", enc_str(b"7.4.0")))
    body += b"\xfa" + enc_str(b"ctime") + enc_int_str(1_700_000_000)
    body += bytes((f.OP_MODULE_AUX,)) + enc_len(mod_id) + enc_len(f.MOD_UINT) + enc_len(2)
    body += enc_len(f.MOD_STRING) + enc_str(b"aux") + enc_len(f.MOD_EOF)
    body += b"\xfe" + enc_len(3) + b"\xfb" + enc_len(len(values) + 1) + enc_len(1)
    body += bytes((f.OP_SLOT_INFO,)) + enc_len(866) + enc_len(10) + enc_len(1)
    offsets = {}
    for i, (key, (t, v)) in enumerate(values.items()):
        if i == 0:
            body += b"\xfd" + struct.pack("<i", 1_800_000_000)  # seconds expiry
        if i == 1:
            body += bytes((f.OP_IDLE,)) + enc_len(300)
        if i == 2:
            body += bytes((f.OP_FREQ,)) + b"\x09"
        offsets[key] = 9 + len(body)
        body += bytes((t,)) + enc_str(key) + v
    body += bytes((f.T_MODULE_2,)) + enc_str(b"json-key") + module_value
    body += bytes((f.OP_FUNCTION2,)) + enc_lzf_literal(FUNCTION_CODE.encode())
    path = tmp_path / "v12.rdb"
    path.write_bytes(rdb_file(12, body))
    with RdbFile(path) as rdb:
        items = list(rdb)
        assert rdb.version == 12 and rdb.checksum_ok and rdb.complete
        assert rdb.aux == {b"redis-ver": b"7.4.0", b"ctime": b"1700000000"}
        assert [(s.slot, s.keys, s.expires) for s in rdb.slot_info] == [(866, 10, 1)]
        assert rdb.dbs[3].resize_keys == len(values) + 1 and rdb.dbs[3].keys == len(values)
        keys = {i.key: i for i in items if isinstance(i, RdbKey)}
        assert list(keys) == list(values)
        for key, (t, v) in values.items():
            k = keys[key]
            assert (k.db, k.type_byte, bytes(k.value), k.offset) == (3, t, v, offsets[key])
        assert keys[b"old-list"].expire_ms == 1_800_000_000_000
        assert keys[b"old-set"].idle == 300 and keys[b"old-set"].expire_ms is None
        assert keys[b"old-zset"].freq == 9
        skipped = [i for i in items if isinstance(i, RdbModuleSkipped)]
        assert [(s.db, s.key, s.module_name) for s in skipped] == [
            (0, None, "ReJSON-RL"),
            (3, b"json-key", "ReJSON-RL"),
        ]
        assert [i.code.decode() for i in items if isinstance(i, RdbFunction)] == [FUNCTION_CODE]
        del keys, items, k
    summary = scan_rdb(path)
    assert summary.module_keys_skipped == 1 and summary.modules_seen == ["ReJSON-RL"]
    assert summary.keys_per_db == {3: len(values)}


@pytest.mark.parametrize("version", [9, 10, 11])
def test_handmade_older_versions_and_no_checksum(tmp_path: Path, version: int) -> None:
    body = (
        b"\xfe\x00" + bytes((f.T_SET_INTSET,)) + enc_str(b"s") + enc_str(b"\x02\x00\x00\x00\x01\x00\x07\x00")
    )
    path = tmp_path / "v.rdb"
    path.write_bytes(rdb_file(version, body, checksum=False))
    summary = scan_rdb(path)
    assert (summary.version, summary.checksum, summary.checksum_ok) == (version, 0, True)
    assert summary.keys_per_db == {0: 1}


def test_unsupported_type_names_type_and_offset(tmp_path: Path) -> None:
    body = b"\xfe\x00" + enc_str(b"x").join((bytes((f.T_STRING,)), enc_str(b"1"))) + b"\x06" + enc_str(b"m")
    path = tmp_path / "u.rdb"
    path.write_bytes(rdb_file(12, body))
    bad_at = 9 + body.index(b"\x06" + enc_str(b"m"))
    with pytest.raises(RdbFormatError, match=rf"type 6 \(module-pre-ga\) at offset {bad_at}"):
        _iterate(path)


# -- Valkey 8 (RDB v11) fixture, made by tests/fixtures/rdb/make_valkey_fixture.py ---------------
def test_valkey8_v11_fixture() -> None:
    path = FIXTURES / "valkey8_cluster_v11.rdb"
    expected = json.loads((FIXTURES / "valkey8_cluster_v11.json").read_text())
    with RdbFile(path) as rdb:
        keys = [i for i in rdb if isinstance(i, RdbKey)]
        assert rdb.version == 11 and rdb.checksum_ok
        assert rdb.aux[b"valkey-ver"].decode() == expected["server_version"]
        assert len(rdb.slot_info) == expected["slots_with_keys"] > 1
        assert sum(s.keys for s in rdb.slot_info) == len(keys) == len(expected["dumps"])
        types = {k.type_byte for k in keys}
        assert {f.T_SET_LISTPACK, f.T_STREAM_LISTPACKS_3} <= types
        for k in keys:
            # byte-exact against the DUMP that the Valkey server itself returned
            assert restore_payload(k.type_byte, k.value, 11).hex() == expected["dumps"][k.key.decode()]
        del keys, k
