"""The embedded S3's object bodies as files under ``$CACHEVAULT_HOME/s3/``, memory flat in object size.

moto 5.2.1 (pinned) keeps every object body in a SpooledTemporaryFile, assembles all parts
of a multipart upload in one bytearray on completion (``moto/s3/models.py``,
``FakeMultipart.complete``: ``total.extend(part.value)``, plus a second whole-object copy
for the FULL_OBJECT checksum) and answers a GET with the whole body as bytes; DESIGN.md
measured +1.4 GB of peak RSS for a 600 MB object and GETs at 27 MiB/s. ``install`` patches
five seams, keeping moto's API semantics (ETags, ``-N`` multipart ETags, metadata, SSE
headers, checksums, CopyObject):

* every FakeKey body (objects and uploaded parts) is a named file under the root, written
  as the request arrives and removed when moto disposes of the key (but not by the reset
  that stops a durable environment: ``keep_bodies``; s3_durable.py records the committed
  ones and registers them again at the next start);
* completing a multipart upload checks the parts as moto does and keeps the part files as
  the object's body (:class:`PartFiles`, in part order): nothing is copied, so completion
  costs the same for 1 KB as for 20 GB (the kernel copy it replaces took 2.9 s for 1 GiB
  here, two test suites running, at the end of every capture). Each part's checksum is
  taken when it arrives, from the bytes the request already holds; a FULL_OBJECT CRC is
  combined from them (:func:`crc32_combine`);
* UploadPartCopy reads only the requested range of the source file;
* a GET served over HTTP (server mode) streams the file, ranged GETs only their range; an
  in-process (``mock_aws``) GET still gets bytes, as botocore's stub needs;
* each request body (a 16 MiB part) stays reachable through a reference cycle of moto's
  response object until the cyclic GC runs (measured: RSS climbing 16 MiB per part for
  ten parts): a full collection every 64 MiB of uploaded bodies bounds that (one per
  request would halve the upload rate: the server's heap is large).
"""

from __future__ import annotations

import binascii
import codecs
import contextlib
import contextvars
import gc
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

CHUNK = 1 << 20  # bytes per read when streaming a body or checksumming a file

_lock = threading.Lock()
_root: Path | None = None
_installed = False
# True while a durable environment shuts down: moto's reset closes every body, the files stay
# (cachevault_tools/local/s3_durable.py registers them again at the next start).
_keep_bodies = False
# Set while S3Response.get_object runs inside a Flask request: FakeKey.value is then a FileBody.
_stream_body: contextvars.ContextVar[bool] = contextvars.ContextVar("cachevault_s3_stream_body", default=False)


def root() -> Path | None:
    """The directory object files are written to now (None before ``install``)."""
    return _root


def install(directory: Path) -> None:
    """Put new object bodies under ``directory`` and patch moto's S3 (patching is idempotent)."""
    global _root, _installed
    directory.mkdir(parents=True, exist_ok=True)
    keep_bodies(False)
    with _lock:
        _root = directory
        if _installed:
            return
        from moto.s3 import models, responses

        models.tempfile = _TempfileShim()  # type: ignore[attr-defined]
        getter = models.FakeKey.value.fget
        setter = models.FakeKey.value.fset
        models.FakeKey.value = property(_value_getter(getter), _value_setter(setter))  # type: ignore[method-assign]
        models.FakeMultipart.complete = _complete  # type: ignore[method-assign]
        models.FakeMultipart.set_part = _set_part_patch(models.FakeMultipart.set_part)  # type: ignore[method-assign]
        models.S3Backend.upload_part_copy = _upload_part_copy_patch(models.S3Backend.upload_part_copy)  # type: ignore[method-assign]
        responses.S3Response.get_object = _get_object_patch(responses.S3Response.get_object)  # type: ignore[method-assign]
        for name in ("upload_part", "put_object"):
            setattr(responses.S3Response, name, _collecting(getattr(responses.S3Response, name)))
        _installed = True


def keep_bodies(keep: bool) -> None:
    """``True``: closing a body (moto disposing of its key) leaves its file in place."""
    global _keep_bodies
    _keep_bodies = keep


# ---------------------------------------------------------------------------- bodies as files

BODY_PREFIX = "obj-"


class ObjectFile:
    """One FakeKey body: a file under the root, removed on close (moto's dispose) unless detached."""

    def __init__(self, directory: Path | None, *, existing: str | None = None) -> None:
        if existing is not None:  # a body kept from an earlier run (adopt)
            self.name = existing
            self._file = open(existing, "r+b")  # noqa: SIM115 - closed by close()
        else:
            assert directory is not None
            directory.mkdir(parents=True, exist_ok=True)
            fd, self.name = tempfile.mkstemp(dir=directory, prefix=BODY_PREFIX)
            self._file = os.fdopen(fd, "w+b")
        self._owns_file = True

    @classmethod
    def adopt(cls, path: str) -> ObjectFile:
        """The body file ``path`` (already written) as a FakeKey body, owned like a new one."""
        return cls(None, existing=path)

    @property
    def names(self) -> list[str]:
        """The files holding the body, in order (one)."""
        return [self.name]

    def segments(self, length: int) -> list[tuple[str, int, int]]:
        self._file.flush()
        return [(self.name, 0, length)]

    def __getattr__(self, name: str) -> Any:  # seek, read, write, truncate, tell, flush
        return getattr(self._file, name)

    def detach(self) -> str:
        """Hand the file over to the caller: close() keeps it. Returns its path."""
        self._file.flush()
        self._owns_file = False
        return self.name

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            if self._owns_file and not _keep_bodies:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.name)


class PartFiles:
    """A completed multipart upload's body: its part files in part order, never concatenated.

    Reads as one file (``seek``/``read``/``tell``: moto's in-process GET and CopyObject read
    ``FakeKey.value``); writing is not supported: moto writes a body only through the
    ``FakeKey.value`` setter, which replaces this with an :class:`ObjectFile` first
    (``_value_setter``). No file stays open: each read opens what it needs.
    """

    def __init__(self, paths: list[str], lengths: list[int] | None = None) -> None:
        if not paths:
            raise ValueError("a multipart body has at least one part")
        self.names = list(paths)
        self.lengths = list(lengths) if lengths is not None else [os.path.getsize(p) for p in paths]
        self._pos = 0
        self._closed = False

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def closed(self) -> bool:
        return self._closed

    def segments(self, length: int) -> list[tuple[str, int, int]]:
        return FileBody(list(zip(self.names, [0] * len(self.names), self.lengths, strict=True)))[:length].segments

    def flush(self) -> None:
        pass

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: sum(self.lengths)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        total = sum(self.lengths)
        end = total if size is None or size < 0 else min(total, self._pos + size)
        data = FileBody(self.segments(total))[self._pos : end].read_all() if end > self._pos else b""
        self._pos += len(data)
        return data

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not _keep_bodies:
            for path in self.names:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


def body_files(buffer: Any) -> list[str] | None:
    """The files of a FakeKey body kept by this module, in order; None for any other buffer."""
    if isinstance(buffer, (ObjectFile, PartFiles)):
        return buffer.names
    return None


class _TempfileShim:
    """Stands in for the ``tempfile`` module inside ``moto.s3.models`` (FakeKey bodies only)."""

    def SpooledTemporaryFile(self, *args: Any, **kwargs: Any) -> ObjectFile:
        directory = _root if _root is not None else Path(tempfile.gettempdir())
        return ObjectFile(directory)

    def __getattr__(self, name: str) -> Any:
        return getattr(tempfile, name)


class FileBody:
    """Byte ranges of files read as one body: sliceable like bytes, iterated in chunks.

    ``segments`` are ``(path, offset, length)`` in order: one file for a PutObject body, the
    part files of a completed multipart upload.
    """

    def __init__(self, segments: list[tuple[str, int, int]]) -> None:
        self.segments = [s for s in segments if s[2] > 0]
        self.length = sum(s[2] for s in self.segments)

    def __len__(self) -> int:
        return self.length

    def __bool__(self) -> bool:
        return self.length > 0

    def __getitem__(self, item: slice) -> FileBody:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("FileBody supports contiguous slices only")
        start, stop, _ = item.indices(self.length)
        picked: list[tuple[str, int, int]] = []
        at = 0  # where the current segment starts within this body
        for path, offset, length in self.segments:
            lo, hi = max(start, at), min(stop, at + length)
            if lo < hi:
                picked.append((path, offset + lo - at, hi - lo))
            at += length
        return FileBody(picked)

    def __iter__(self) -> Iterator[bytes]:
        for path, offset, length in self.segments:
            with open(path, "rb") as fh:
                fh.seek(offset)
                left = length
                while left > 0:  # bounded: each round reads >= 1 byte or stops
                    chunk = fh.read(min(CHUNK, left))
                    if not chunk:
                        raise OSError(f"{path}: {left} bytes missing")
                    left -= len(chunk)
                    yield chunk

    def read_all(self) -> bytes:
        return b"".join(self)


def _body(key: Any) -> FileBody:
    return FileBody(key._value_buffer.segments(key.contentsize))


def _value_getter(original: Any) -> Any:
    def value(self: Any) -> Any:
        if _stream_body.get():
            return _body(self)
        return original(self)

    return value


class PartsBody:
    """The value ``_complete`` hands to ``put_object``: the upload's part files, taken over.

    moto disposes of the upload's parts (``del bucket.multiparts[id]``) before it stores
    the object, so the part files are detached from their keys first; the object's key
    adopts them as its body (``_value_setter``), or they are removed when this is dropped.
    """

    def __init__(self, parts: list[Any]) -> None:
        self.paths: list[str] = []
        self.lengths = [p.contentsize for p in parts]
        for part in parts:
            self.paths.append(part._value_buffer.detach())
            part._value_buffer.close()  # the fd only: the file is the caller's now
        self.size = sum(self.lengths)
        self._taken = False

    def __len__(self) -> int:
        return self.size

    def take(self) -> PartFiles:
        self._taken = True
        return PartFiles(self.paths, self.lengths)

    def __del__(self) -> None:
        if not self._taken:
            for path in self.paths:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def _value_setter(original: Any) -> Any:
    def value(self: Any, new_value: Any) -> None:
        buffer = getattr(self, "_value_buffer", None)
        if isinstance(new_value, PartsBody):
            if buffer is not None:
                buffer.close()  # the empty file FakeKey.__init__ made
            self._value_buffer = new_value.take()
            self.contentsize = new_value.size
            return
        if isinstance(buffer, PartFiles):  # a new body for a key that held parts: one file again
            buffer.close()
            self._value_buffer = _TempfileShim().SpooledTemporaryFile()
        original(self, new_value)
        if getattr(self, "_etag", None) is None and isinstance(new_value, (bytes, bytearray, memoryview)):
            # The ETag from the bytes at hand: moto's FakeKey.etag would read the file back for it.
            self._etag = hashlib.md5(new_value, usedforsecurity=False).hexdigest()

    return value


# ---------------------------------------------------------------------------- multipart completion


def _set_part_patch(original: Any) -> Any:
    """FakeMultipart.set_part, plus the part's checksum taken from the bytes already at hand."""

    def set_part(self: Any, part_id: int, value: Any) -> Any:
        key = original(self, part_id, value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            running = _Running(_builder(self).checksum_algorithm)
            running.update(value)
            key._cachevault_part_checksum = running.result()
        return key

    return set_part


class PartChecksum(NamedTuple):
    """One part's checksum: plain values, so moto can still deepcopy or pickle the keys
    that reach it (ListObjectVersions deep-copies each version, its multipart parts included)."""

    algorithm: str
    digest: bytes
    crc: int | None  # zlib's CRC-32 value when crc32_combine can join it, else None


def _builder(multipart: Any) -> Any:
    from moto.s3.models import MultipartChecksumBuilder

    metadata = multipart.metadata
    return MultipartChecksumBuilder(metadata.get("x-amz-checksum-algorithm"), metadata.get("x-amz-checksum-type"))


def _complete(self: Any, body: Iterator[tuple[int, str]]) -> tuple[Any, str, tuple[str, str, int] | None]:
    """FakeMultipart.complete with the same checks and results, never holding the object."""
    from moto.s3.exceptions import EntityTooSmall, InvalidPart, MalformedXML
    from moto.s3.models import S3_UPLOAD_PART_MIN_SIZE

    decode_hex = codecs.getdecoder("hex_codec")
    md5s = bytearray()
    parts: list[Any] = []
    last = None
    for pn, etag in body:
        part = self.parts.get(pn)
        part_etag = None
        if part is not None:
            part_etag = part.etag.replace('"', "")
            etag = etag.replace('"', "")
        if part is None or part_etag != etag:
            raise InvalidPart()
        if last is not None and last.contentsize < S3_UPLOAD_PART_MIN_SIZE:
            raise EntityTooSmall()
        md5s.extend(decode_hex(part_etag)[0])  # type: ignore[arg-type]
        parts.append(part)
        last = part
    if not parts:
        raise MalformedXML
    full_etag = hashlib.md5(bytes(md5s), usedforsecurity=False)
    checksum = _checksum(_builder(self), parts)  # before the part files change hands
    return PartsBody(parts), f"{full_etag.hexdigest()}-{len(parts)}", checksum


def _part_checksum(part: Any, algorithm: str) -> PartChecksum:
    """The part's checksum taken on arrival (``_set_part_patch``), or read from its file."""
    taken = getattr(part, "_cachevault_part_checksum", None)
    if isinstance(taken, PartChecksum) and taken.algorithm == algorithm:
        return taken
    running = _Running(algorithm)
    for chunk in _body(part):
        running.update(chunk)
    return running.result()


def _checksum(builder: Any, parts: list[Any]) -> tuple[str, str, int]:
    """MultipartChecksumBuilder.build() of these parts, from the checksums taken per part."""
    from moto.s3.utils import compute_checksum

    algorithm = builder.checksum_algorithm
    if builder.checksum_type == "COMPOSITE":
        composite = b"".join(_part_checksum(p, algorithm).digest for p in parts)
        return builder.checksum_type, compute_checksum(composite, algorithm).decode(), len(parts)
    sums = [_part_checksum(p, algorithm) for p in parts]
    crcs = [s.crc for s in sums]
    if all(crc is not None for crc in crcs):
        crc = crcs[0]
        for part, one in zip(parts[1:], crcs[1:], strict=True):
            crc = crc32_combine(crc, one, part.contentsize)  # type: ignore[arg-type]
        whole = _Running(algorithm)
        whole.crc = crc  # type: ignore[assignment]
    else:  # a checksum that does not combine: one pass over the parts, in chunks
        whole = _Running(algorithm)
        for part in parts:
            for chunk in _body(part):
                whole.update(chunk)
    return builder.checksum_type, binascii.b2a_base64(whole.digest(), newline=False).decode(), 1


class _Running:
    """moto.s3.utils.compute_checksum (same algorithms, same fallbacks), fed in chunks."""

    def __init__(self, algorithm: str) -> None:
        from moto.core.compat import HAS_CRT

        self.algorithm = algorithm
        self.crc = 0
        self.width = 4
        self.hash: Any = None
        # True while this is zlib's CRC-32 (binascii.crc32): crc32_combine joins two of them.
        self.combinable = True
        if algorithm == "SHA1":
            self.hash = hashlib.sha1(usedforsecurity=False)
        elif algorithm == "CRC32C":
            try:
                import crc32c  # type: ignore[import-not-found]

                self.combinable = False
                self.update = lambda data: setattr(self, "crc", crc32c.crc32c(data, self.crc))  # type: ignore[method-assign]
            except ImportError:  # moto falls back to CRC32 too
                pass
        elif algorithm == "CRC64NVME" and HAS_CRT:
            from awscrt import checksums  # type: ignore[import-not-found]

            self.width = 8
            self.combinable = False
            self.update = lambda data: setattr(self, "crc", checksums.crc64nvme(data, self.crc))  # type: ignore[method-assign]
        elif algorithm not in ("CRC32", "CRC32C", "CRC64NVME"):
            self.hash = hashlib.sha256(usedforsecurity=False)
        if self.hash is not None:
            self.combinable = False

    def update(self, data: Any) -> None:
        if self.hash is not None:
            self.hash.update(data)
        else:
            self.crc = binascii.crc32(data, self.crc)

    def digest(self) -> bytes:
        if self.hash is not None:
            return self.hash.digest()
        return self.crc.to_bytes(self.width, "big")

    def result(self) -> PartChecksum:
        return PartChecksum(self.algorithm, self.digest(), self.crc if self.combinable else None)


# zlib's crc32_combine (zlib 1.2.12's crc32.c: multmodp, x2nmodp), which Python's zlib does
# not expose: CRC-32 of A+B from CRC(A), CRC(B) and len(B) in O(log len(B)).
_CRC32_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial (bit-reflected)."""
    m, p = 1 << 31, 0
    while True:  # bounded: m shifts right each round, a has at most 32 bits
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC32_POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """``binascii.crc32(a + b)`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)``."""
    p, k, n = 1 << 31, 3, len2  # x^0; x^(2^3) is one byte
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


# ---------------------------------------------------------------------------- copy and GET


def _upload_part_copy_patch(original: Any) -> Any:
    def upload_part_copy(
        self: Any,
        dest_bucket_name: str,
        multipart_id: str,
        part_id: int,
        src_bucket_name: str,
        src_key_name: str,
        src_version_id: str | None,
        start_byte: int,
        end_byte: int,
    ) -> Any:
        if start_byte is None:
            return original(
                self, dest_bucket_name, multipart_id, part_id, src_bucket_name, src_key_name,
                src_version_id, start_byte, end_byte,
            )  # fmt: skip
        multipart = self.get_bucket(dest_bucket_name).multiparts[multipart_id]
        src = self.get_object(src_bucket_name, src_key_name, version_id=src_version_id)
        value = _body(src)[start_byte : end_byte + 1].read_all()
        return multipart.set_part(part_id, value)

    return upload_part_copy


_uncollected = 0  # request body bytes received since the last full collection
COLLECT_EVERY = 64 << 20


def freeze_heap() -> None:
    """Move every object alive now out of the collector's sight (``gc.freeze``).

    Called once the server is up and the template deployed: moto's backends, botocore's
    service models and the deployed stack are long-lived, and each full collection that
    ``_collecting`` runs would otherwise walk all of them again (measured: half the server's
    CPU during an upload). Objects created later, the request bodies' cycles among them,
    are collected as before.
    """
    gc.collect()
    gc.freeze()


def _collecting(original: Any) -> Any:
    def handler(self: Any) -> Any:
        global _uncollected
        try:
            return original(self)
        finally:
            _uncollected += len(self.raw_body or b"")
            if _uncollected >= COLLECT_EVERY:
                _uncollected = 0
                gc.collect()

    return handler


def _get_object_patch(original: Any) -> Any:
    def get_object(self: Any) -> Any:
        from flask import has_request_context

        if not has_request_context():  # in-process mock: botocore's stub wants bytes
            return original(self)
        token = _stream_body.set(True)
        try:
            return original(self)
        finally:
            _stream_body.reset(token)

    return get_object
