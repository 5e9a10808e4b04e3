"""Streaming RDB reader: each key with its RAW value bytes, for RESTORE.

``RdbFile`` mmaps a local file read-only; every value handed out is a zero-copy
memoryview slice of the map, so an RDB of many GB is never held in Python memory.
``RdbStream`` reads the same records from a sequential byte source (an S3 object read
with ranged GETs, storage.S3RangeReader) through a window of a few MiB: a record that
runs past the window's end is parsed again once the window holds it. Values are never
decoded: their boundaries come from walking the encoding (rdb_values).

Offsets in a key tuple from ``iter_raw`` index ``reader.window`` as it is when the tuple
is handed out (the whole file for ``RdbFile``); ``RdbKey.offset`` and errors give offsets
in the file. Release every ``RdbKey.value`` view before closing a file: an mmap with live
exports cannot be unmapped (``close`` then leaves the unmapping to the GC).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol

from cachevault.core.errors import RdbFormatError
from cachevault.rdb import encoding as f
from cachevault.rdb.dump_payload import crc64
from cachevault.rdb.encoding import read_len, read_string, skip_string, truncated
from cachevault.rdb.values import SUPPORTED_TYPES, skip_module_opcodes, skip_value, unsupported_type

_CRC_CHUNK = 64 << 20
STREAM_WINDOW = 8 << 20  # RdbStream: bytes read per refill (a bigger value grows the window)


@dataclass(frozen=True, slots=True)
class RdbKey:
    db: int
    key: bytes
    type_byte: int
    value: memoryview
    expire_ms: int | None
    offset: int  # offset of the type byte
    idle: int | None = None  # LRU idle seconds (OP_IDLE), for RESTORE IDLETIME
    freq: int | None = None  # LFU counter (OP_FREQ), for RESTORE FREQ


@dataclass(frozen=True, slots=True)
class RdbAux:
    name: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class RdbFunction:
    code: bytes  # FUNCTION2 payload, for FUNCTION LOAD REPLACE


@dataclass(frozen=True, slots=True)
class RdbModuleSkipped:
    db: int
    key: bytes | None  # None for module AUX data
    module_name: str
    offset: int


@dataclass(frozen=True, slots=True)
class SlotInfo:
    slot: int
    keys: int
    expires: int


@dataclass(slots=True)
class DbStats:
    resize_keys: int | None = None  # RESIZEDB hint
    resize_expires: int | None = None
    keys: int = 0  # restorable keys actually read
    expires: int = 0
    module_keys: int = 0  # module values skipped (not counted in keys)


RdbItem = RdbKey | RdbAux | RdbFunction | RdbModuleSkipped
# (db, key, type_byte, value_start, value_end, expire_ms, offset, idle, freq): see iter_raw.
RawKey = tuple[int, bytes, int, int, int, int | None, int, int | None, int | None]


@dataclass(slots=True)
class RdbSummary:
    version: int
    aux: dict[bytes, bytes]
    functions: int
    keys_per_db: dict[int, int]
    expires_per_db: dict[int, int]
    module_keys_skipped: int
    modules_seen: list[str]
    total_bytes: int
    checksum: int
    checksum_ok: bool  # True also when the writer disabled checksums (checksum == 0)
    type_counts: dict[int, int] = field(default_factory=dict)

    @property
    def total_keys(self) -> int:
        return sum(self.keys_per_db.values())


class RdbFile:
    """Context manager over an mmap of an RDB file; iterate it for keys and metadata."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as fh:
            self.size = os.fstat(fh.fileno()).st_size
            if self.size < f.HEADER_LEN:
                raise RdbFormatError(
                    f"not an RDB file: {self.size} bytes, the header needs {f.HEADER_LEN} (offset 0)",
                    offset=0,
                )
            self._mm: mmap.mmap | None = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._mm.madvise(mmap.MADV_SEQUENTIAL)
        self._dropped = 0
        self._view: memoryview | None = memoryview(self._mm)
        # The window: the whole map, never refilled.
        self._buf: mmap.mmap | bytes = self._mm
        self._base = 0
        self._final = True
        self._read_header(self._mm[: f.HEADER_LEN])

    def _read_header(self, header: bytes) -> None:
        if header[:5] != f.MAGIC or not header[5:].isdigit():
            self.close()
            raise RdbFormatError(f"bad RDB magic {header!r} at offset 0", offset=0)
        self.version = int(header[5:])
        if not 1 <= self.version <= f.MAX_VERSION:
            self.close()
            raise RdbFormatError(
                f"unsupported RDB version {self.version} at offset 5 (this reader knows 1..{f.MAX_VERSION})",
                offset=5,
            )
        self._reset()

    def _reset(self) -> None:
        self._dropped = 0
        self._window_size = len(self._buf)  # bytes in the current window
        self._at = f.HEADER_LEN  # window offset of the record being parsed
        self._pending: tuple[int, int | None, int | None, int | None] = (0, None, None, None)
        self.aux: dict[bytes, bytes] = {}
        self.dbs: dict[int, DbStats] = {}
        self.slot_info: list[SlotInfo] = []
        self.functions = 0
        self.module_keys_skipped = 0
        self.modules_seen: set[str] = set()
        self.type_counts: dict[int, int] = {}
        self.checksum: int | None = None
        self.checksum_ok: bool | None = None  # None until EOF was reached
        self.complete = False

    @property
    def view(self) -> memoryview:
        """The current window as a memoryview (slice it with iter_raw's offsets)."""
        if self._view is None:
            raise ValueError("RdbFile is closed")
        return self._view

    window = view

    @property
    def window_offset(self) -> int:
        """The file offset of ``window[0]`` (a key tuple's ``offset`` minus this indexes the window)."""
        return self._base

    def _refill(self, keep_from: int) -> tuple[mmap.mmap | bytes, int, bool]:
        """Slide the window to start at ``keep_from`` and read more: (buffer, length, final)."""
        raise AssertionError("an mmapped file is one final window")

    def drop_pages(self, end: int) -> None:
        """Unmap already-read pages before ``end`` from this process (MADV_DONTNEED).

        The file is mapped read-only, so this only drops them from our RSS (the page cache
        keeps them; touching them again re-reads). Keeps RSS bounded on many-GB files.
        """
        if self._mm is None:
            return
        end -= end % mmap.PAGESIZE
        if end > self._dropped:
            self._mm.madvise(mmap.MADV_DONTNEED, self._dropped, end - self._dropped)
            self._dropped = end

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        if self._view is not None:
            with contextlib.suppress(BufferError):
                self._view.release()
            self._view = None
        if self._mm is not None:
            # BufferError: the caller still holds value views; the map goes when they do.
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None

    def __enter__(self) -> RdbFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[RdbItem]:
        if self._view is None:
            raise ValueError("RdbFile is closed")
        for item in self.iter_raw():
            if type(item) is tuple:
                db, key, op, vstart, vend, expire, start, idle, freq = item
                yield RdbKey(db, key, op, self._view[vstart:vend], expire, start, idle, freq)
            else:
                yield item  # type: ignore[misc]

    def iter_raw(self) -> Iterator[RawKey | RdbAux | RdbFunction | RdbModuleSkipped]:
        """Like iterating the file, but a key is a plain tuple of offsets (the hot path).

        ``(db, key, type_byte, value_start, value_end, expire_ms, offset, idle, freq)``: the
        value is ``reader.window[value_start:value_end]`` (read the attribute for every
        tuple: a stream moves its window between tuples). No object per key but the tuple
        and the key bytes, so a loader can copy the value straight from the map.
        """
        if self._view is None:
            raise ValueError("RdbFile is closed")
        if self._base != 0:
            raise ValueError("an RdbStream is read once")
        self._reset()
        while True:  # one round per window; an mmapped file is one window
            try:
                yield from self._iter_window()
                return
            except RdbFormatError as exc:
                if self._final or not getattr(exc, "truncated", False):
                    if self._base:
                        raise RdbFormatError(f"{exc} (offset counted from byte {self._base} of the file)") from exc
                    raise
                # The record at self._at runs past the window: read on from its first byte.
                self._buf, self._window_size, self._final = self._refill(self._at)
                self._at = 0

    def _iter_window(self) -> Iterator[RawKey | RdbAux | RdbFunction | RdbModuleSkipped]:
        """The records that lie whole in the current window, from ``self._at``.

        State that spans records (db, pending expire/idle/freq) lives on ``self`` so the
        next window goes on where this one stopped; a record cut by the window's end raises
        a truncation error before it changes any of it.
        """
        buf, size, base = self._buf, self._window_size, self._base
        version = self.version
        pos = self._at
        db, expire, idle, freq = self._pending
        stats = self._db(db)
        type_counts = self.type_counts
        supported = SUPPORTED_TYPES
        start = pos
        try:
            for _ in range(size + 1):  # bounded: every record consumes at least one byte
                start = pos
                if pos >= size:
                    raise truncated(pos, 1, size)
                op = buf[pos]
                pos += 1
                if op < f.OP_SLOT_INFO:
                    if op not in supported:
                        raise unsupported_type(op, start)
                    # Keys are nearly always short raw strings: read those inline.
                    b = buf[pos] if pos < size else 0xFF
                    if b < 0x40 and pos + 1 + b <= size:
                        vstart = pos + 1 + b
                        key = buf[pos + 1 : vstart]
                    else:
                        key, vstart = read_string(buf, pos, size)
                    if op == f.T_STRING:
                        b = buf[vstart] if vstart < size else 0xFF
                        if b < 0x40:
                            pos = vstart + 1 + b
                        elif b < 0x80 and vstart + 1 < size:
                            pos = vstart + 2 + (((b & 0x3F) << 8) | buf[vstart + 1])
                        else:
                            pos = skip_string(buf, vstart, size)
                        if pos > size:
                            pos = skip_string(buf, vstart, size)  # raises with the exact offset
                    elif op == f.T_MODULE_2:
                        mid, p = read_len(buf, vstart, size)
                        pos = skip_module_opcodes(buf, p, size)
                        name = f.module_name(mid)
                        self.module_keys_skipped += 1
                        self.modules_seen.add(name)
                        stats.module_keys += 1
                        yield RdbModuleSkipped(db, key, name, base + start)
                        expire = idle = freq = None
                        continue
                    else:
                        pos = skip_value(buf, vstart, size, op)
                    stats.keys += 1
                    if expire is not None:
                        stats.expires += 1
                    type_counts[op] = type_counts.get(op, 0) + 1
                    yield (db, key, op, vstart, pos, expire, base + start, idle, freq)
                    expire = idle = freq = None
                elif op == f.OP_EXPIRETIME_MS:
                    if pos + 8 > size:
                        raise truncated(pos, 8, size)
                    # v9+ writes little endian; older files came from LE hosts in practice.
                    expire = int.from_bytes(buf[pos : pos + 8], "little", signed=True)
                    pos += 8
                elif op == f.OP_EXPIRETIME:
                    if pos + 4 > size:
                        raise truncated(pos, 4, size)
                    expire = int.from_bytes(buf[pos : pos + 4], "little", signed=True) * 1000
                    pos += 4
                elif op == f.OP_SELECTDB:
                    db, pos = read_len(buf, pos, size)
                    stats = self._db(db)
                elif op == f.OP_RESIZEDB:
                    stats.resize_keys, pos = read_len(buf, pos, size)
                    stats.resize_expires, pos = read_len(buf, pos, size)
                elif op == f.OP_AUX:
                    name_b, pos = read_string(buf, pos, size)
                    value_b, pos = read_string(buf, pos, size)
                    self.aux[name_b] = value_b
                    if name_b == b"slot-info":  # Valkey cluster: "slot,keys,expires"
                        self.slot_info.append(_parse_slot_info(value_b, base + start))
                    yield RdbAux(name_b, value_b)
                elif op == f.OP_FUNCTION2:
                    code, pos = read_string(buf, pos, size)
                    self.functions += 1
                    yield RdbFunction(code)
                elif op == f.OP_SLOT_INFO:
                    slot, pos = read_len(buf, pos, size)
                    keys, pos = read_len(buf, pos, size)
                    expires, pos = read_len(buf, pos, size)
                    self.slot_info.append(SlotInfo(slot, keys, expires))
                elif op == f.OP_IDLE:
                    idle, pos = read_len(buf, pos, size)
                elif op == f.OP_FREQ:
                    if pos >= size:
                        raise truncated(pos, 1, size)
                    freq = buf[pos]
                    pos += 1
                elif op == f.OP_MODULE_AUX:
                    mid, pos = read_len(buf, pos, size)
                    when_op, pos = read_len(buf, pos, size)
                    if when_op != f.MOD_UINT:
                        raise RdbFormatError(f"bad module aux when-opcode {when_op} at offset {start}")
                    _, pos = read_len(buf, pos, size)  # when
                    pos = skip_module_opcodes(buf, pos, size)
                    name = f.module_name(mid)
                    self.modules_seen.add(name)
                    yield RdbModuleSkipped(db, None, name, base + start)
                elif op == f.OP_FUNCTION_PRE_GA:
                    raise RdbFormatError(
                        f"pre-GA function record (Redis 7.0 release candidate) at offset {start} is not supported",
                        offset=start,
                    )
                else:  # OP_EOF
                    self._finish(buf, size, start, version)
                    return
            raise truncated(pos, 1, size)
        except RdbFormatError:
            # Where the next window starts over: the first byte of the record that failed,
            # with the state the records before it left.
            self._at, self._pending = start, (db, expire, idle, freq)
            raise

    def _db(self, db: int) -> DbStats:
        stats = self.dbs.get(db)
        if stats is None:
            stats = self.dbs[db] = DbStats()
        return stats

    def _finish(self, buf: mmap.mmap | bytes, size: int, eof_at: int, version: int) -> None:
        """Check the trailer: 8-byte LE CRC64 of everything up to and including the EOF byte."""
        end = eof_at + 1
        if version >= 5:
            if end + 8 > size:
                raise truncated(end, 8, size)
            expected = int.from_bytes(buf[end : end + 8], "little")
            end += 8
            self.checksum = expected
            if expected == 0:  # writer ran with rdbchecksum no
                self.checksum_ok = True
            else:
                crc = self._content_crc(eof_at + 1)
                if crc != expected:
                    raise RdbFormatError(
                        f"RDB checksum mismatch at offset {self._base + eof_at + 1}: "
                        f"file says {expected:016x}, content gives {crc:016x}",
                        offset=self._base + eof_at + 1,
                    )
                self.checksum_ok = True
        if self._base + end != self.size:
            raise RdbFormatError(
                f"{self.size - self._base - end} unexpected byte(s) after the RDB end at offset {self._base + end}",
                offset=self._base + end,
            )
        self.complete = True

    def _content_crc(self, end: int) -> int:
        """CRC64 of the file's first ``end`` bytes (``end`` counted in the window)."""
        assert self._view is not None
        crc = 0
        self._dropped = 0  # a second pass over the map: drop behind it again
        for chunk_at in range(0, end, _CRC_CHUNK):
            with self._view[chunk_at : min(chunk_at + _CRC_CHUNK, end)] as chunk:
                crc = crc64(chunk, crc)
            self.drop_pages(chunk_at)  # keep RSS bounded on many-GB files
        return crc


class ByteSource(Protocol):
    """Sequential bytes of known total size (storage.S3RangeReader)."""

    size: int

    def read(self, n: int) -> bytes:
        """The next ``n`` bytes, fewer only at the end."""
        ...

    def close(self) -> None: ...


class RdbStream(RdbFile):
    """The records of an RDB read once, front to back, from a ByteSource (no file, no mmap).

    Memory: one window (``window`` bytes, or one record when a record is bigger) plus
    whatever the caller still holds of earlier windows. The CRC64 trailer is checked over
    the bytes as they are read, so the end of the stream is the end of the check.
    """

    def __init__(self, source: ByteSource, *, window: int = STREAM_WINDOW) -> None:
        self.path = repr(source)
        self.size = int(source.size)
        self._source: ByteSource | None = source
        self._step = max(window, 1)
        self._mm = None
        self._dropped = 0
        self._crc = 0
        self._read = 0
        if self.size < f.HEADER_LEN:
            raise RdbFormatError(
                f"not an RDB file: {self.size} bytes, the header needs {f.HEADER_LEN} (offset 0)", offset=0
            )
        self._buf = self._fetch(b"", max(self._step, f.HEADER_LEN))
        self._view = memoryview(self._buf)
        self._base = 0
        self._final = self._read >= self.size
        self._read_header(self._buf[: f.HEADER_LEN])

    def _fetch(self, keep: bytes, want: int) -> bytes:
        assert self._source is not None
        data = self._source.read(min(want, self.size - self._read))
        # The trailer's CRC covers every byte before the last 8.
        covered = max(0, min(len(data), self.size - 8 - self._read))
        if covered:
            with memoryview(data)[:covered] as part:
                self._crc = crc64(part, self._crc)
        self._read += len(data)
        if len(data) == 0 and self._read < self.size:
            raise RdbFormatError(f"the source ended at byte {self._read} of {self.size}", offset=self._read)
        return keep + data if keep else data

    def _refill(self, keep_from: int) -> tuple[bytes, int, bool]:
        if self._view is None:
            raise ValueError("RdbStream is closed")
        keep = bytes(self._buf[keep_from:])
        # A new bytes object every time: views the caller still holds keep the old one alive.
        self._base += keep_from
        self._buf = self._fetch(keep, max(self._step, len(keep)))
        self._view = memoryview(self._buf)
        return self._buf, len(self._buf), self._read >= self.size

    def _content_crc(self, end: int) -> int:
        if self._base + end + 8 != self.size:
            at = self._base + end + 8
            raise RdbFormatError(f"{self.size - at} unexpected byte(s) after the RDB end at offset {at}", offset=at)
        return self._crc

    def drop_pages(self, end: int) -> None:
        """Nothing mapped: a window is dropped when the stream moves past it."""

    def close(self) -> None:
        self._view = None
        if self._source is not None:
            self._source.close()
            self._source = None


def _parse_slot_info(value: bytes, offset: int) -> SlotInfo:
    try:
        slot, keys, expires = (int(x) for x in value.split(b","))
    except ValueError:
        raise RdbFormatError(f"bad slot-info aux {value!r} at offset {offset}", offset=offset) from None
    return SlotInfo(slot, keys, expires)


def scan_rdb(path: str | os.PathLike[str] | ByteSource) -> RdbSummary:
    """One pass over an RDB (a file or a ByteSource): what is in it, and whether it is whole."""
    with open_rdb(path) as rdb:
        for item in rdb:
            if isinstance(item, RdbKey):
                item.value.release()  # so close() can unmap
        return RdbSummary(
            version=rdb.version,
            aux=dict(rdb.aux),
            functions=rdb.functions,
            keys_per_db={db: s.keys for db, s in rdb.dbs.items() if s.keys},
            expires_per_db={db: s.expires for db, s in rdb.dbs.items() if s.expires},
            module_keys_skipped=rdb.module_keys_skipped,
            modules_seen=sorted(rdb.modules_seen),
            total_bytes=rdb.size,
            checksum=rdb.checksum or 0,
            checksum_ok=bool(rdb.checksum_ok),
            type_counts=dict(rdb.type_counts),
        )


def open_rdb(source: str | os.PathLike[str] | ByteSource) -> RdbFile:
    """An mmapped RdbFile for a path, an RdbStream for a ByteSource."""
    if isinstance(source, (str, os.PathLike)):
        return RdbFile(source)
    return RdbStream(source)
