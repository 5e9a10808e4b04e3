"""Cluster nodes' parts of one or more RDBs, each a new RDB: the records of the slots it owns.

A resharded (or cluster-mode) seeded restore gives every new primary the keys of its slots
from every source RDB: a node's seed cuts its own part (restore.seed_cluster, ``cut``), or one
cutter reads each source once and routes every record to its node (restore.cutter,
``cut_routed``). Records are copied as they are, never decoded or
re-encoded: the reader finds their boundaries (rdb.reader), the key's slot decides, and the
bytes from the type byte to the value's end go out behind the record's expire, LRU and LFU
opcodes. The new file has one header (the highest RDB version of the sources: each target
already accepts it, restore preflight), database 0, each function library once, no aux
fields, and its own CRC64 trailer, so the server checks what it loads end to end.

Keys whose TTL passed before the cut are left out and counted, as the RESTORE path does.
"""

from __future__ import annotations

import time
from array import array
from binascii import crc_hqx
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from cachevault.core.errors import RdbFormatError
from cachevault.rdb import encoding as f
from cachevault.rdb.dump_payload import crc64
from cachevault.rdb.reader import RdbAux, RdbFile, RdbFunction, RdbModuleSkipped

FLUSH_BYTES = 1 << 20  # bytes gathered before they go to the sink
_SLOT_MASK = 16383
Route = Sequence[int]  # slot -> 1 + the index of the writer that takes its records; 0: none
Sampler = Callable[[int, bytes, int, memoryview, int | None], None]  # db, key, type byte, value, expire_ms


@dataclass
class Sampling:
    """Which written records a cut hands to ``on_sample`` (the value is a view into the reader's
    window: copy what you keep): the first key of source ``i``, then one in ``every[i]``, at most
    ``per_source`` of each source, whatever its key count turns out to be."""

    on_sample: Sampler
    every: Sequence[int]
    per_source: int


@dataclass
class CutStats:
    keys: int = 0  # records written
    keys_with_ttl: int = 0
    keys_expired_skipped: int = 0
    keys_elsewhere: int = 0  # records of slots this node does not own
    functions: int = 0  # libraries written
    bytes_written: int = 0  # the whole file's, once the writer is closed (RdbWriter.close)
    # By source: (keys of the owned slots, written or expired; every key the source holds).
    per_source: list[tuple[int, int]] = field(default_factory=list)


def owned_slots(ranges: Iterable[tuple[int, int]]) -> bytearray:
    """16384 flags, 1 for each slot in ``ranges`` (inclusive pairs)."""
    owned = bytearray(_SLOT_MASK + 1)
    for start, end in ranges:
        owned[start : end + 1] = b"\x01" * (end - start + 1)
    return owned


def encode_len(n: int) -> bytes:
    """RDB length encoding (6-bit, 14-bit, 32-bit or 64-bit)."""
    if n < 0x40:
        return bytes((n,))
    if n < 0x4000:
        return bytes((0x40 | (n >> 8), n & 0xFF))
    if n <= 0xFFFFFFFF:
        return b"\x80" + n.to_bytes(4, "big")
    return b"\x81" + n.to_bytes(8, "big")


def library_name(code: bytes) -> str:
    """The library a FUNCTION payload defines (its ``#!<engine> name=<lib>`` line)."""
    first = code.split(b"\n", 1)[0].decode("utf-8", "replace")
    for word in first.split():
        if word.startswith("name="):
            return word[5:]
    return first[:80]


class RdbWriter:
    """A new RDB, written through ``sink`` in chunks of about ``flush_bytes``, CRC64 as it goes."""

    def __init__(self, sink: Callable[[bytes], None], version: int, flush_bytes: int = FLUSH_BYTES) -> None:
        if not 1 <= version <= f.MAX_VERSION:
            raise ValueError(f"RDB version {version} is not one this writer knows (1..{f.MAX_VERSION})")
        self.sink = sink
        self.flush_bytes = flush_bytes
        self.crc = 0
        self.written = 0
        self.buf = bytearray(b"%s%04d" % (f.MAGIC, version))  # emptied in place: cut keeps a reference
        self.buf += bytes((f.OP_SELECTDB, 0))

    def flush(self) -> None:
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            self._emit(data)

    def record(self, data: memoryview) -> None:
        """A record of ``flush_bytes`` or more: sent alone after what was gathered, copied once
        (through the gathering buffer, a 19 MB value took three fresh copies)."""
        self.flush()
        self._emit(bytes(data))

    def _emit(self, data: bytes) -> None:
        self.crc = crc64(data, self.crc)
        self.written += len(data)
        self.sink(data)

    def function(self, code: bytes) -> None:
        self.buf += bytes((f.OP_FUNCTION2,))
        self.buf += encode_len(len(code))
        self.buf += code

    def close(self) -> int:
        """The EOF opcode and the CRC64 trailer; the file's size."""
        self.buf += bytes((f.OP_EOF,))
        self.flush()
        trailer = self.crc.to_bytes(8, "little")
        self.sink(trailer)
        self.written += len(trailer)
        return self.written


def cut(
    sources: Iterable[Callable[[], RdbFile]],
    owned: bytearray,
    writer: RdbWriter,
    *,
    now_ms: int | None = None,
) -> CutStats:
    """Copy the records of the ``owned`` slots (``owned_slots``) from each source (opened in
    turn) into ``writer``. The writer is flushed as it fills, not closed: the caller closes it
    once all is well."""
    return cut_routed(sources, owned, [writer], now_ms=now_ms)[0]


def route_slots(parts: Sequence[Iterable[tuple[int, int]]]) -> Route:
    """The route giving each writer the slot ranges at its index in ``parts``."""
    route = array("I", bytes(4 * (_SLOT_MASK + 1)))
    for index, ranges in enumerate(parts, start=1):
        for start, end in ranges:
            route[start : end + 1] = array("I", [index]) * (end - start + 1)
    return route


def cut_routed(
    sources: Iterable[Callable[[], RdbFile]],
    route: Route,
    writers: Sequence[RdbWriter],
    *,
    now_ms: int | None = None,
    sampling: Sampling | None = None,
) -> list[CutStats]:
    """Copy every record of each source (opened in turn, read once) into the writer its slot is
    routed to; each writer's counts. Every writer gets the function libraries. The writers are
    flushed, not closed: the caller closes them once all is well (every source checked).

    ``sampling``: the records handed on for Verify to compare with what the nodes hold.
    """
    stats = [CutStats() for _ in writers]
    now = int(time.time() * 1000) if now_ms is None else now_ms
    libraries: set[str] = set()
    for index, opener in enumerate(sources):
        before = [s.keys + s.keys_expired_skipped for s in stats]
        with opener() as rdb:
            every = _cut_one(rdb, route, writers, now, stats, libraries, sampling, index)
            if not rdb.complete:
                raise RdbFormatError(f"source {index} ended before its EOF opcode")
        for part, start in zip(stats, before, strict=True):
            mine = part.keys + part.keys_expired_skipped - start
            part.keys_elsewhere += every - mine
            part.per_source.append((mine, every))
    for writer in writers:
        writer.flush()
    return stats


def _cut_one(
    rdb: RdbFile,
    route: Route,
    writers: Sequence[RdbWriter],
    now: int,
    stats: list[CutStats],
    libraries: set[str],
    sampling: Sampling | None,
    index: int,
) -> int:
    """One source's records into their writers; how many keys it holds."""
    # The hot loop: one tuple per key (RdbFile.iter_raw), locals and lists only. The window is
    # read from the reader's own fields (this package's): two property calls per key cost 0.36 s
    # of the 4.3 s a 1.1 GB RDB of 1.2 M keys took; a list indexes faster than the array.
    table = list(route)
    bufs = [w.buf for w in writers]
    limits = [w.flush_bytes for w in writers]
    n = len(writers)
    keys, ttl, expired = [0] * n, [0] * n, [0] * n
    every = 0
    never = 1 << 62  # one comparison per key: sampling off (or done) is "never"
    next_sample, taken = (1, 0) if sampling and sampling.per_source > 0 else (never, 0)
    try:
        for item in rdb.iter_raw():
            if type(item) is tuple:
                db, key, _op, vstart, vend, expire, offset, idle, freq = item
                every += 1
                i = key.find(b"{")
                if i >= 0 and (j := key.find(b"}", i + 1)) > i + 1:
                    slot = crc_hqx(key[i + 1 : j], 0) & _SLOT_MASK
                else:
                    slot = crc_hqx(key, 0) & _SLOT_MASK
                to = table[slot] - 1
                if to < 0:
                    continue
                if db != 0:
                    raise RdbFormatError(f"key {key[:80]!r} is in database {db}: a cluster node has database 0 only")
                buf = bufs[to]
                if expire is not None:
                    if expire < now:
                        expired[to] += 1
                        continue
                    buf += b"\xfc" + expire.to_bytes(8, "little", signed=True)
                    ttl[to] += 1
                if idle is not None:
                    buf += b"\xf8" + encode_len(idle)
                if freq is not None:
                    buf += bytes((f.OP_FREQ, freq))
                keys[to] += 1
                if every >= next_sample:
                    assert sampling is not None
                    sampling.on_sample(db, key, _op, rdb._view[vstart:vend], expire)
                    taken += 1
                    next_sample = every + max(1, sampling.every[index]) if taken < sampling.per_source else never
                if vend - vstart < limits[to]:
                    buf += rdb._view[offset - rdb._base : vend]
                    if len(buf) >= limits[to]:
                        writers[to].flush()
                else:
                    writers[to].record(rdb._view[offset - rdb._base : vend])
            elif isinstance(item, RdbFunction):
                name = library_name(item.code)
                if name not in libraries:  # every shard of a cluster holds the same libraries
                    libraries.add(name)
                    for writer, part in zip(writers, stats, strict=True):
                        writer.function(item.code)
                        part.functions += 1
            elif isinstance(item, RdbModuleSkipped):
                raise RdbFormatError(f"module data ({item.module_name}) at offset {item.offset} cannot be copied")
            elif not isinstance(item, RdbAux):  # aux fields describe the source, not this file
                raise RdbFormatError(f"unexpected record {item!r}")
    finally:
        for to, part in enumerate(stats):
            part.keys += keys[to]
            part.keys_with_ttl += ttl[to]
            part.keys_expired_skipped += expired[to]
    return every
