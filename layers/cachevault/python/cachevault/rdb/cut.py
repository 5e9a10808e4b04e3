"""One cluster node's part of one or more RDBs, as a new RDB: the records of the slots it owns.

A resharded (or cluster-mode) seeded restore gives every new primary the keys of its slots
from every source RDB (restore.seed). Records are copied as they are, never decoded or
re-encoded: the reader finds their boundaries (rdb.reader), the key's slot decides, and the
bytes from the type byte to the value's end go out behind the record's expire, LRU and LFU
opcodes. The new file has one header (the highest RDB version of the sources: each target
already accepts it, restore preflight), database 0, each function library once, no aux
fields, and its own CRC64 trailer, so the server checks what it loads end to end.

Keys whose TTL passed before the cut are left out and counted, as the RESTORE path does.
"""

from __future__ import annotations

import time
from binascii import crc_hqx
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cachevault.core.errors import RdbFormatError
from cachevault.rdb import encoding as f
from cachevault.rdb.dump_payload import crc64
from cachevault.rdb.reader import RdbAux, RdbFile, RdbFunction, RdbModuleSkipped

FLUSH_BYTES = 1 << 20  # bytes gathered before they go to the sink
_SLOT_MASK = 16383


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
    """A new RDB, written through ``sink`` in chunks of about FLUSH_BYTES, CRC64 as it goes."""

    def __init__(self, sink: Callable[[bytes], None], version: int) -> None:
        if not 1 <= version <= f.MAX_VERSION:
            raise ValueError(f"RDB version {version} is not one this writer knows (1..{f.MAX_VERSION})")
        self.sink = sink
        self.crc = 0
        self.written = 0
        self.buf = bytearray(b"%s%04d" % (f.MAGIC, version))
        self.buf += bytes((f.OP_SELECTDB, 0))

    def flush(self) -> None:
        if self.buf:
            data = bytes(self.buf)
            self.buf = bytearray()
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
    """Copy the records of the ``owned`` slots from each source (opened in turn) into ``writer``.

    The writer is flushed as it fills, not closed: the caller closes it once all is well.
    """
    stats = CutStats()
    now = int(time.time() * 1000) if now_ms is None else now_ms
    libraries: set[str] = set()
    for index, opener in enumerate(sources):
        before = stats.keys + stats.keys_expired_skipped
        before_all = before + stats.keys_elsewhere
        with opener() as rdb:
            _cut_one(rdb, owned, writer, now, stats, libraries)
            if not rdb.complete:
                raise RdbFormatError(f"source {index} ended before its EOF opcode")
        owned_keys = stats.keys + stats.keys_expired_skipped
        stats.per_source.append((owned_keys - before, owned_keys + stats.keys_elsewhere - before_all))
    writer.flush()
    return stats


def _cut_one(rdb: RdbFile, owned: bytearray, writer: RdbWriter, now: int, stats: CutStats, libraries: set[str]) -> None:
    # The hot loop: one tuple per key (RdbFile.iter_raw), locals only.
    buf = writer.buf
    keys = ttl = expired = elsewhere = 0
    flush_at = FLUSH_BYTES
    try:
        for item in rdb.iter_raw():
            if type(item) is tuple:
                db, key, _op, _vstart, vend, expire, offset, idle, freq = item
                i = key.find(b"{")
                if i >= 0 and (j := key.find(b"}", i + 1)) > i + 1:
                    slot = crc_hqx(key[i + 1 : j], 0) & _SLOT_MASK
                else:
                    slot = crc_hqx(key, 0) & _SLOT_MASK
                if not owned[slot]:
                    elsewhere += 1
                    continue
                if db != 0:
                    raise RdbFormatError(f"key {key[:80]!r} is in database {db}: a cluster node has database 0 only")
                if expire is not None:
                    if expire < now:
                        expired += 1
                        continue
                    buf += b"\xfc" + expire.to_bytes(8, "little", signed=True)
                    ttl += 1
                if idle is not None:
                    buf += b"\xf8" + encode_len(idle)
                if freq is not None:
                    buf += bytes((f.OP_FREQ, freq))
                buf += rdb.window[offset - rdb.window_offset : vend]
                keys += 1
                if len(buf) >= flush_at:
                    writer.flush()
                    buf = writer.buf
            elif isinstance(item, RdbFunction):
                name = library_name(item.code)
                if name not in libraries:  # every shard of a cluster holds the same libraries
                    libraries.add(name)
                    writer.function(item.code)
                    stats.functions += 1
            elif isinstance(item, RdbModuleSkipped):
                raise RdbFormatError(f"module data ({item.module_name}) at offset {item.offset} cannot be copied")
            elif not isinstance(item, RdbAux):  # aux fields describe the source, not this file
                raise RdbFormatError(f"unexpected record {item!r}")
    finally:
        stats.keys += keys
        stats.keys_with_ttl += ttl
        stats.keys_expired_skipped += expired
        stats.keys_elsewhere += elsewhere
