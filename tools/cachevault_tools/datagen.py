"""Seeded, realistic, incompressible datasets for benchmarks and tests.

Every RDB encoding a snapshot must survive: strings (raw, with TTLs), small hashes
(listpack) and large ones (hashtable), lists (quicklist), intsets and hashtable sets,
small and large sorted sets (listpack / skiplist), streams with consumer groups and a
pending-entries list, and a function library. Values are random bytes (LZF cannot shrink
them: DEBUG POPULATE's zero padding compresses 20x and lies about speed).

Commands are packed to RESP by hand and pipelined over a raw socket with one batch in
flight, which keeps the server busy at well over 50 MB/s.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import hiredis

MiB = 1 << 20
POOL_SIZE = 16 * MiB
BATCH_BYTES = 4 * MiB  # bytes of packed commands per round trip
TTL_FAR_S = 7 * 24 * 3600  # TTLs far enough out that nothing expires during a test

FUNCTION_LIBRARY = """#!lua name=cvbench
redis.register_function('cv_get', function(keys, args) return redis.call('GET', keys[1]) end)
redis.register_function{function_name='cv_ro_len', callback=function(keys, args)
  return redis.call('STRLEN', keys[1]) end, flags={'no-writes'}}
"""


@dataclass
class DatasetStats:
    seed: int
    target_mb: int
    payload_bytes: int = 0
    keys: int = 0
    commands: int = 0
    seconds: float = 0.0
    by_type: dict[str, int] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.payload_bytes / MiB / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mb_per_s"] = round(self.mb_per_s, 1)
        return d


def pack(*args: bytes | str | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n" % len(b))
        out.append(b)
        out.append(b"\r\n")
    return b"".join(out)


class _Pool:
    """Random bytes from a seeded pool: slicing is much faster than fresh randbytes.

    Each value is a random window of random data, so it does not compress on its own
    (RDB compresses value by value), and windows rarely repeat.
    """

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.data = rnd.randbytes(POOL_SIZE)

    def take(self, n: int) -> bytes:
        off = self.rnd.randrange(0, POOL_SIZE - n)
        return self.data[off : off + n]


def _commands(rnd: random.Random, target: int, stats: DatasetStats) -> Iterator[bytes]:
    """Yield packed commands until about ``target`` bytes of payload were produced."""
    pool = _Pool(rnd)
    yield pack("FUNCTION", "LOAD", "REPLACE", FUNCTION_LIBRARY)
    by_type = stats.by_type
    i = 0
    while stats.payload_bytes < target:
        i += 1
        roll = rnd.random()
        if roll < 0.60:  # plain strings, 32 B .. 2 KiB, a fifth with a TTL
            v = pool.take(rnd.randrange(32, 2048))
            key = b"str:%d" % i
            if rnd.random() < 0.2:
                yield pack("SET", key, v, "EX", TTL_FAR_S + rnd.randrange(3600))
            else:
                yield pack("SET", key, v)
            kind, size = "string", len(v)
        elif roll < 0.61:  # big strings, 16-128 KiB
            v = pool.take(rnd.randrange(16 << 10, 128 << 10))
            yield pack("SET", b"big:%d" % i, v)
            kind, size = "string", len(v)
        elif roll < 0.73:  # small hash (listpack)
            n = rnd.randrange(2, 64)
            args: list[bytes | str | int] = ["HSET", b"hs:%d" % i]
            for f in range(n):
                args += [b"f%d" % f, pool.take(rnd.randrange(8, 60))]
            yield pack(*args)
            kind, size = "hash", sum(len(a) for a in args[3::2])
        elif roll < 0.75:  # large hash (hashtable: > 128 fields)
            n = rnd.randrange(200, 600)
            args = ["HSET", b"hl:%d" % i]
            for f in range(n):
                args += [b"field:%d" % f, pool.take(rnd.randrange(16, 200))]
            yield pack(*args)
            kind, size = "hash", sum(len(a) for a in args[3::2])
        elif roll < 0.83:  # lists (quicklist)
            n = rnd.randrange(10, 400)
            vals = [pool.take(rnd.randrange(16, 512)) for _ in range(n)]
            yield pack("RPUSH", b"list:%d" % i, *vals)
            kind, size = "list", sum(map(len, vals))
        elif roll < 0.87:  # intset
            members = rnd.sample(range(1_000_000_000), rnd.randrange(10, 500))
            yield pack("SADD", b"iset:%d" % i, *members)
            kind, size = "set", 8 * len(members)
        elif roll < 0.90:  # hashtable set
            vals = [pool.take(rnd.randrange(16, 96)) for _ in range(rnd.randrange(150, 400))]
            yield pack("SADD", b"set:%d" % i, *vals)
            kind, size = "set", sum(map(len, vals))
        elif roll < 0.96:  # sorted sets, small (listpack) or large (skiplist)
            n = rnd.randrange(5, 100) if rnd.random() < 0.6 else rnd.randrange(200, 600)
            args = ["ZADD", b"zset:%d" % i]
            size = 0
            for _ in range(n):
                m = pool.take(rnd.randrange(8, 48))
                args += [repr(rnd.uniform(-1e6, 1e6)), m]
                size += len(m) + 8
            yield pack(*args)
            kind = "zset"
        else:  # stream with a consumer group and a pending-entries list
            key = b"stream:%d" % i
            n = rnd.randrange(20, 200)
            size = 0
            for _ in range(n):
                v = pool.take(rnd.randrange(16, 256))
                yield pack("XADD", key, "*", "field", v, "n", rnd.randrange(1000))
                size += len(v) + 8
                stats.commands += 1
            yield pack("XGROUP", "CREATE", key, "grp", "0")
            count = rnd.randrange(1, n)
            yield pack("XREADGROUP", "GROUP", "grp", "consumer-1", "COUNT", count, "STREAMS", key, ">")
            stats.commands += 2
            kind = "stream"
        stats.commands += 1
        stats.keys += 1
        stats.payload_bytes += size
        by_type[kind] = by_type.get(kind, 0) + 1


def _small_keys(rnd: random.Random, target: int, stats: DatasetStats) -> Iterator[bytes]:
    """Many small keys (~900 B average, ~1.1 M per GiB): strings, a fifth with a TTL, some small hashes."""
    pool = _Pool(rnd)
    i = 0
    while stats.payload_bytes < target:
        i += 1
        if rnd.random() < 0.9:
            v = pool.take(rnd.randrange(100, 1700))
            if rnd.random() < 0.2:
                yield pack("SET", b"k:%d" % i, v, "EX", TTL_FAR_S + rnd.randrange(3600))
            else:
                yield pack("SET", b"k:%d" % i, v)
            kind, size = "string", len(v)
        else:
            args: list[bytes | str | int] = ["HSET", b"h:%d" % i]
            for f in range(rnd.randrange(2, 16)):
                args += [b"f%d" % f, pool.take(rnd.randrange(16, 120))]
            yield pack(*args)
            kind, size = "hash", sum(len(a) for a in args[3::2])  # type: ignore[arg-type]
        stats.commands += 1
        stats.keys += 1
        stats.payload_bytes += size
        stats.by_type[kind] = stats.by_type.get(kind, 0) + 1


def _large_values(rnd: random.Random, target: int, stats: DatasetStats) -> Iterator[bytes]:
    """Few large values (4-32 MiB each) of every type, each sent in commands of ~1 MiB."""
    pool = _Pool(rnd)
    kinds = ("string", "hash", "list", "set", "zset", "stream")
    i = 0
    while stats.payload_bytes < target:
        kind = kinds[i % len(kinds)]
        i += 1
        key = b"%s:%d" % (kind.encode(), i)
        total = min(rnd.randrange(4 * MiB, 32 * MiB), max(target - stats.payload_bytes, 1))
        if kind == "string":
            value = b"".join(pool.take(min(MiB, total - at)) for at in range(0, total, MiB))
            yield pack("SET", key, value)
            stats.commands += 1
        else:
            element = 4096
            n = max(1, total // element)
            for start in range(0, n, 256):
                ids = range(start, min(n, start + 256))
                members = [b"%08d" % j + pool.take(element - 8) for j in ids]
                if kind == "hash":
                    yield pack("HSET", key, *[x for j, m in zip(ids, members, strict=True) for x in (b"f%d" % j, m)])
                elif kind == "list":
                    yield pack("RPUSH", key, *members)
                elif kind == "set":
                    yield pack("SADD", key, *members)
                elif kind == "zset":
                    yield pack("ZADD", key, *[x for j, m in zip(ids, members, strict=True) for x in (j, m)])
                else:
                    for m in members:
                        yield pack("XADD", key, "*", "v", m)
                        stats.commands += 1
                stats.commands += 1
            total = n * element
        stats.keys += 1
        stats.payload_bytes += total
        stats.by_type[kind] = stats.by_type.get(kind, 0) + 1


# A string whose body is allocated exactly once as one 8 MiB block: a SET's big-argument
# buffer (sds header + value + CRLF + NUL) and the RDB loader's string (header + value + NUL)
# both fit the 8 MiB size class, so redis-server holds ~1 byte per byte of data.
EXACT_STRING_BYTES = 8 * MiB - 12


def _large_strings(rnd: random.Random, target: int, stats: DatasetStats) -> Iterator[bytes]:
    """Strings of ``EXACT_STRING_BYTES``: as much data as this machine's memory can hold (large_shard)."""
    pool = _Pool(rnd)
    while stats.payload_bytes < target:
        stats.keys += 1
        value = b"".join(pool.take(min(MiB, EXACT_STRING_BYTES - at)) for at in range(0, EXACT_STRING_BYTES, MiB))
        yield pack("SET", b"string:%d" % stats.keys, value)
        stats.commands += 1
        stats.payload_bytes += len(value)
    stats.by_type["string"] = stats.keys


SHAPES = {
    "mixed": _commands,
    "small-keys": _small_keys,
    "large-values": _large_values,
    "large-strings": _large_strings,
}


def _read_replies(sock: socket.socket, reader: hiredis.Reader, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    got = 0
    while got < count:
        reply = reader.gets()
        if reply is False:
            if time.monotonic() > deadline:
                raise TimeoutError(f"datagen: {count - got} replies missing after {timeout}s")
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError("datagen: server closed the connection")
            reader.feed(data)
            continue
        if isinstance(reply, hiredis.ReplyError):
            raise RuntimeError(f"datagen: server error: {reply}")
        got += 1


def generate(
    host: str,
    port: int,
    size_mb: int,
    *,
    seed: int = 1,
    password: str | None = None,
    timeout: float = 600.0,
    shape: str = "mixed",
) -> DatasetStats:
    """Load about ``size_mb`` MiB of seeded data of ``shape`` (see SHAPES) into ``host:port`` (db 0).

    The same seed always produces the same keys and values (stream IDs and TTL deadlines
    depend on the clock).
    """
    rnd = random.Random(seed)
    stats = DatasetStats(seed=seed, target_mb=size_mb)
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=30) as sock:
        reader = hiredis.Reader()
        if password:
            sock.sendall(pack("AUTH", password))
            _read_replies(sock, reader, 1, 30)
        batch: list[bytes] = []
        batch_len = 0
        in_flight = 0  # replies owed for the batch sent before this one
        for cmd in SHAPES[shape](rnd, size_mb * MiB, stats):
            batch.append(cmd)
            batch_len += len(cmd)
            if batch_len >= BATCH_BYTES:
                sock.sendall(b"".join(batch))
                # One batch in flight: the server parses this one while we build the next.
                _read_replies(sock, reader, in_flight, timeout)
                in_flight = len(batch)
                batch, batch_len = [], 0
        if batch:
            sock.sendall(b"".join(batch))
        _read_replies(sock, reader, in_flight + len(batch), timeout)
    stats.seconds = time.monotonic() - started
    return stats
