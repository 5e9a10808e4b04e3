"""The embedded S3's object bodies as files under ``$CACHEVAULT_HOME/s3/``, memory flat in object size.

moto 5.2.1 (pinned) keeps every object body in a SpooledTemporaryFile, assembles all parts
of a multipart upload in one bytearray on completion (``moto/s3/models.py``,
``FakeMultipart.complete``: ``total.extend(part.value)``, plus a second whole-object copy
for the FULL_OBJECT checksum) and answers a GET with the whole body as bytes; DESIGN.md
measured +1.4 GB of peak RSS for a 600 MB object and GETs at 27 MiB/s. ``install`` patches
four seams, keeping moto's API semantics (ETags, ``-N`` multipart ETags, metadata, SSE
headers, checksums, CopyObject):

* every FakeKey body (objects and uploaded parts) is a named file under the root, written
  as the request arrives and removed when moto disposes of the key (but not by the reset
  that stops a durable environment: ``keep_bodies``; s3_durable.py records the committed
  ones and registers them again at the next start);
* completing a multipart upload checks the parts as moto does, then concatenates the part
  files into the object's file in the kernel (``os.copy_file_range``), checksums streamed;
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
from typing import Any

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


class _TempfileShim:
    """Stands in for the ``tempfile`` module inside ``moto.s3.models`` (FakeKey bodies only)."""

    def SpooledTemporaryFile(self, *args: Any, **kwargs: Any) -> ObjectFile:
        directory = _root if _root is not None else Path(tempfile.gettempdir())
        return ObjectFile(directory)

    def __getattr__(self, name: str) -> Any:
        return getattr(tempfile, name)


class FileBody:
    """``length`` bytes of a file from ``offset``: sliceable like bytes, iterated in chunks."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        self.path, self.offset, self.length = path, offset, length

    def __len__(self) -> int:
        return self.length

    def __bool__(self) -> bool:
        return self.length > 0

    def __getitem__(self, item: slice) -> FileBody:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("FileBody supports contiguous slices only")
        start, stop, _ = item.indices(self.length)
        return FileBody(self.path, self.offset + start, max(0, stop - start))

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            left = self.length
            while left > 0:  # bounded: each round reads >= 1 byte or stops
                chunk = fh.read(min(CHUNK, left))
                if not chunk:
                    raise OSError(f"{self.path}: {left} bytes missing")
                left -= len(chunk)
                yield chunk

    def read_all(self) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            return fh.read(self.length)


def _body(key: Any) -> FileBody:
    buffer = key._value_buffer
    buffer.flush()
    return FileBody(buffer.name, 0, key.contentsize)


def _value_getter(original: Any) -> Any:
    def value(self: Any) -> Any:
        if _stream_body.get():
            return _body(self)
        return original(self)

    return value


class PartsBody:
    """The value ``_complete`` hands to ``put_object``: the part files, concatenated on write.

    moto disposes of the upload's parts (``del bucket.multiparts[id]``) before it stores
    the object, so the part files are detached from their keys first; they are removed as
    soon as they are copied (one copy of the object on disk), or when this is dropped.
    """

    def __init__(self, parts: list[Any]) -> None:
        self.parts = [FileBody(p._value_buffer.detach(), 0, p.contentsize) for p in parts]
        self.size = sum(p.length for p in self.parts)

    def __len__(self) -> int:
        return self.size

    def write_to(self, out: Any) -> None:
        out.flush()
        fd = out.fileno()
        for part in self.parts:
            with open(part.path, "rb") as src:
                left, src_fd = part.length, src.fileno()
                while left > 0:  # bounded: each round copies >= 1 byte or raises
                    copied = os.copy_file_range(src_fd, fd, left)
                    if copied == 0:
                        raise OSError(f"{part.path}: {left} bytes missing")
                    left -= copied
            os.unlink(part.path)
        out.seek(0, os.SEEK_END)

    def __del__(self) -> None:
        for part in self.parts:
            with contextlib.suppress(OSError):
                os.unlink(part.path)


def _value_setter(original: Any) -> Any:
    def value(self: Any, new_value: Any) -> None:
        if isinstance(new_value, PartsBody):
            self._value_buffer.seek(0)
            self._value_buffer.truncate()
            new_value.write_to(self._value_buffer)
            self.contentsize = new_value.size
            return
        original(self, new_value)

    return value


# ---------------------------------------------------------------------------- multipart completion


def _complete(self: Any, body: Iterator[tuple[int, str]]) -> tuple[Any, str, tuple[str, str, int] | None]:
    """FakeMultipart.complete with the same checks and results, never holding the object."""
    from moto.s3.exceptions import EntityTooSmall, InvalidPart, MalformedXML
    from moto.s3.models import S3_UPLOAD_PART_MIN_SIZE, MultipartChecksumBuilder

    checksum = MultipartChecksumBuilder(
        self.metadata.get("x-amz-checksum-algorithm"), self.metadata.get("x-amz-checksum-type")
    )
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
    value = PartsBody(parts)
    return value, f"{full_etag.hexdigest()}-{len(parts)}", _checksum(checksum, value)


def _checksum(builder: Any, value: PartsBody) -> tuple[str, str, int]:
    """MultipartChecksumBuilder.build() of these parts, each part read once, in chunks."""
    from moto.s3.utils import compute_checksum

    algorithm = builder.checksum_algorithm
    if builder.checksum_type == "COMPOSITE":
        composite = bytearray()
        for part in value.parts:
            one = _Running(algorithm)
            for chunk in part:
                one.update(chunk)
            composite += one.digest()
        return builder.checksum_type, compute_checksum(bytes(composite), algorithm).decode(), len(value.parts)
    whole = _Running(algorithm)
    for part in value.parts:
        for chunk in part:
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
        if algorithm == "SHA1":
            self.hash = hashlib.sha1(usedforsecurity=False)
        elif algorithm == "CRC32C":
            try:
                import crc32c  # type: ignore[import-not-found]

                self.update = lambda data: setattr(self, "crc", crc32c.crc32c(data, self.crc))  # type: ignore[method-assign]
            except ImportError:  # moto falls back to CRC32 too
                pass
        elif algorithm == "CRC64NVME" and HAS_CRT:
            from awscrt import checksums  # type: ignore[import-not-found]

            self.width = 8
            self.update = lambda data: setattr(self, "crc", checksums.crc64nvme(data, self.crc))  # type: ignore[method-assign]
        elif algorithm not in ("CRC32", "CRC32C", "CRC64NVME"):
            self.hash = hashlib.sha256(usedforsecurity=False)

    def update(self, data: bytes) -> None:
        if self.hash is not None:
            self.hash.update(data)
        else:
            self.crc = binascii.crc32(data, self.crc)

    def digest(self) -> bytes:
        if self.hash is not None:
            return self.hash.digest()
        return self.crc.to_bytes(self.width, "big")


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
