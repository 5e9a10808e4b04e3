"""S3 layout, streaming multipart upload, manifest and checksum helpers.

Layout (ElastiCache export naming, shard index 1-based on 4 digits)::

    snapshots/<name>/<name>-0001.rdb
    snapshots/<name>/manifest.json
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote

from botocore.exceptions import ClientError

from cachevault.core.errors import ChecksumMismatch, InvalidParameterValue, SnapshotNotFoundFault

SNAPSHOTS_PREFIX = "snapshots/"
RESTORES_PREFIX = "restores/"
MANIFEST_NAME = "manifest.json"
MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB  # S3: every part but the last must be >= 5 MiB
MAX_PART_SIZE = 5 * 1024 * MiB  # S3: at most 5 GiB per part
MAX_PARTS = 10_000
DEFAULT_PART_SIZE = 16 * MiB
DOWNLOAD_CHUNK = MiB
RANGE_SIZE = 8 * MiB  # bytes per ranged GET when streaming an object
# A range cut short or not answered is asked for again (the digest only sees whole ranges);
# the reader's caller (a node's replication link: repl-timeout 60 s) waits meanwhile.
RANGE_ATTEMPTS = 3
RANGE_RETRY_PAUSE_S = 0.5

# Snapshot names reach S3 keys: allow ElastiCache's alphabet plus the dots of
# "automatic.<cache>-YYYY-MM-DD-HH-MM", and nothing that could leave the prefix.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


def check_snapshot_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise InvalidParameterValue(f"snapshot name {name!r} cannot be used in an S3 key")
    return name


# S3's bucket naming rules: 3-63 lowercase letters, digits, dots and hyphens, starting and
# ending with a letter or digit, no "..", not an IP address.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")


def check_bucket_name(name: object, field: str = "TargetBucket") -> str:
    if not isinstance(name, str) or not _BUCKET_RE.match(name) or ".." in name or _IP_RE.match(name):
        raise InvalidParameterValue(
            f"{field} {name!r} is not a valid S3 bucket name: 3 to 63 lowercase letters, digits, dots "
            "and hyphens, beginning and ending with a letter or digit."
        )
    return name


def check_key(key: str) -> str:
    """Refuse keys that are empty, absolute or contain a ``..`` / ``.`` path segment."""
    if not key or key.startswith("/") or "\\" in key or any(c < " " for c in key):
        raise InvalidParameterValue(f"invalid S3 key {key!r}")
    # Percent-decoded too: a layer that URL-decodes keys must not turn %2e%2e into "..".
    if any(seg in ("..", ".") for seg in (*key.split("/"), *unquote(key).split("/"))):
        raise InvalidParameterValue(f"S3 key {key!r} escapes its prefix")
    return key


def snapshot_prefix(snapshot: str) -> str:
    return f"{SNAPSHOTS_PREFIX}{check_snapshot_name(snapshot)}/"


def rdb_key(snapshot: str, shard_index: int) -> str:
    if isinstance(shard_index, bool) or not isinstance(shard_index, int) or not 1 <= shard_index <= 9999:
        raise InvalidParameterValue(f"shard index {shard_index!r} must be 1..9999")
    return f"{snapshot_prefix(snapshot)}{snapshot}-{shard_index:04d}.rdb"


def manifest_key(snapshot: str) -> str:
    return f"{snapshot_prefix(snapshot)}{MANIFEST_NAME}"


def restore_prefix(target: str, execution: str) -> str:
    """Where one restore execution keeps its working objects (LoadShard results)."""
    return f"{RESTORES_PREFIX}{check_snapshot_name(target)}/{check_snapshot_name(execution)}/"


def restore_work_key(target: str, execution: str, source_index: int) -> str:
    if isinstance(source_index, bool) or not 1 <= source_index <= 9999:
        raise InvalidParameterValue(f"source index {source_index!r} must be 1..9999")
    return f"{restore_prefix(target, execution)}load-{source_index:04d}.json"


def restore_targets_key(target: str, execution: str) -> str:
    """The primaries ProvisionCache made ready to load (what a LoadShard worker task reads: ECS
    overrides hold 8 KB, not the Targets of a 500-shard restore)."""
    return f"{restore_prefix(target, execution)}targets.json"


def restore_relay_key(target: str, execution: str) -> str:
    """The token a resharded seeded restore's cutter gives the nodes' seeds (restore.seed_relay)."""
    return f"{restore_prefix(target, execution)}relay.json"


def restore_sources_key(target: str, execution: str) -> str:
    """The checked sources of one restore execution (Preflight writes it, the later steps read it)."""
    return f"{restore_prefix(target, execution)}sources.json"


class PartPlan:
    """The size of each multipart part, so one object never needs more than ``max_parts`` parts.

    Fixed 16 MiB parts stop at 156 GiB. The plan sizes parts for the expected size (e.g.
    predicted from the node's INFO) to fill at most ``planned_parts`` parts, with
    ``max_parts - planned_parts`` in reserve; if the object outgrows the prediction, the part
    size doubles every ``growth_every`` parts beyond the planned ones (S3 allows parts of
    different sizes), which covers 16x the prediction before the last part. Sizes are whole
    MiB, at least ``min_part_size`` and at most S3's 5 GiB.
    """

    def __init__(
        self,
        expected_size: int | None = None,
        *,
        min_part_size: int = DEFAULT_PART_SIZE,
        max_parts: int = MAX_PARTS,
        planned_parts: int = 8_000,
        growth_every: int = 250,
    ) -> None:
        if min_part_size < MIN_PART_SIZE:
            raise InvalidParameterValue(f"part_size must be >= {MIN_PART_SIZE} bytes")
        if not 0 < planned_parts < max_parts or growth_every < 1:
            raise InvalidParameterValue("planned_parts must be below max_parts, growth_every >= 1")
        wanted = -(-int(expected_size or 0) // planned_parts)  # ceil
        self.base = min(MAX_PART_SIZE, max(min_part_size, -(-wanted // MiB) * MiB))
        self.max_parts = max_parts
        self.planned_parts = planned_parts
        self.growth_every = growth_every

    def size(self, part_number: int) -> int:
        """Bytes in part ``part_number`` (1-based) when it is not the last one."""
        if not 1 <= part_number <= self.max_parts:
            raise InvalidParameterValue(f"part number {part_number} is outside 1..{self.max_parts}")
        extra = max(0, part_number - self.planned_parts - 1) // self.growth_every + (
            part_number > self.planned_parts
        )
        return min(MAX_PART_SIZE, self.base << min(extra, 20))

    def capacity(self) -> int:
        """The largest object the plan can hold (every part full)."""
        return sum(self.size(n) for n in range(1, self.max_parts + 1))


class S3MultipartWriter:
    """File-like sink that uploads to S3 while the producer keeps writing.

    Memory stays below ``(max_in_flight + 1) * part_size``: one part being filled plus at
    most ``max_in_flight`` parts queued or uploading; ``write`` blocks (backpressure) when
    all slots are taken. An upload error is re-raised by the next ``write``/``close``,
    after the multipart upload has been aborted. Objects smaller than one part go up
    with a single PUT (no multipart upload at all).

    Part sizes follow a ``PartPlan``: ``part_size`` is the smallest part, ``expected_size``
    (a prediction, may be low) makes parts bigger so the object fits S3's 10,000 parts.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        key: str,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        max_in_flight: int = 2,
        extra_args: dict[str, Any] | None = None,
        expected_size: int | None = None,
        plan: PartPlan | None = None,
    ) -> None:
        self.plan = plan or PartPlan(expected_size, min_part_size=part_size)
        if max_in_flight < 1:
            raise InvalidParameterValue("max_in_flight must be >= 1")
        self.client = client
        self.bucket = bucket
        self.key = check_key(key)
        self.part_size = self.plan.size(1)  # of the part being filled now
        self.max_in_flight = max_in_flight
        self.extra_args = dict(extra_args or {})
        self.size = 0
        self.upload_id: str | None = None
        self.peak_buffered = 0  # observed high-water mark of bytes held, for tests/metrics
        self._buf = bytearray()
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._lock = threading.Lock()
        self._in_flight_bytes = 0
        self._futures: list[Future[dict[str, Any]]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._error: BaseException | None = None
        self._part_number = 0
        self._state = "open"  # open -> closed | aborted

    # -- producer side ---------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._check_usable()
        view = memoryview(data).cast("B")
        n = len(view)
        pos = 0
        while pos < n:
            take = min(self.part_size - len(self._buf), n - pos)
            self._buf += view[pos : pos + take]
            pos += take
            self._note_buffered()
            if len(self._buf) == self.part_size:
                self._submit(self._buf)
                self._buf = bytearray()
                if self._part_number < self.plan.max_parts:
                    self.part_size = self.plan.size(self._part_number + 1)
        self.size += n
        return n

    def close(self) -> dict[str, Any]:
        """Finish the upload; returns ``{"etag", "parts", "size", "multipart"}``."""
        self._check_usable()
        try:
            if self.upload_id is None:
                # Never reached one full part: a single PUT, also for zero bytes.
                resp = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._buf, **self.extra_args)
                self._buf = bytearray()
                self._state = "closed"
                return {"etag": resp["ETag"], "parts": 1, "size": self.size, "multipart": False}
            if self._buf:
                self._submit(self._buf)
                self._buf = bytearray()
            parts = [f.result() for f in self._futures]  # re-raises a worker's error
            self._raise_pending()
            resp = self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": sorted(parts, key=lambda p: p["PartNumber"])},
            )
        except BaseException:
            self.abort()
            raise
        self._shutdown_pool()
        self._state = "closed"
        return {"etag": resp["ETag"], "parts": len(parts), "size": self.size, "multipart": True}

    def abort(self) -> None:
        """Drop everything: queued parts are cancelled, the multipart upload is aborted."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._buf = bytearray()
        self._shutdown_pool(cancel=True)
        if self.upload_id is not None:
            with contextlib.suppress(ClientError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)

    def __enter__(self) -> S3MultipartWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()

    # -- internals -------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._state != "open":
            raise ValueError(f"S3MultipartWriter for {self.key} is {self._state}")
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            err = self._error
            self.abort()
            raise err

    def _note_buffered(self) -> None:
        with self._lock:
            held = len(self._buf) + self._in_flight_bytes
        self.peak_buffered = max(self.peak_buffered, held)

    def _submit(self, part: bytearray) -> None:
        if self.upload_id is None:
            resp = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key, **self.extra_args)
            self.upload_id = resp["UploadId"]
            self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="s3-part")
        if self._part_number >= self.plan.max_parts:
            raise InvalidParameterValue(
                f"{self.key}: more than {self.plan.max_parts} parts ({self.size} bytes so far; the plan holds "
                f"{self.plan.capacity()}): the expected size was far too low"
            )
        # Backpressure: wait for a free slot, but wake up to notice a failed worker.
        while not self._slots.acquire(timeout=0.5):
            self._raise_pending()
        self._raise_pending_releasing()
        self._part_number += 1
        with self._lock:
            self._in_flight_bytes += len(part)
        assert self._pool is not None
        self._futures.append(self._pool.submit(self._upload_part, self._part_number, part))

    def _raise_pending_releasing(self) -> None:
        if self._error is not None:
            self._slots.release()
            self._raise_pending()

    def _upload_part(self, number: int, part: bytearray) -> dict[str, Any]:
        try:
            resp = self.client.upload_part(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=part
            )
            return {"PartNumber": number, "ETag": resp["ETag"]}
        except BaseException as exc:
            if self._error is None:
                self._error = exc
            raise
        finally:
            with self._lock:
                self._in_flight_bytes -= len(part)
            self._slots.release()

    def _shutdown_pool(self, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None


def abort_incomplete_uploads(client: Any, bucket: str, prefix: str) -> int:
    """Abort every multipart upload under ``prefix``; returns how many were aborted."""
    prefix = _check_prefix(prefix)
    aborted = 0
    paginator = client.get_paginator("list_multipart_uploads")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for up in page.get("Uploads", []):
            with contextlib.suppress(ClientError):  # already gone: that is the goal
                client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                aborted += 1
    return aborted


def delete_prefix(client: Any, bucket: str, prefix: str) -> int:
    """Delete every object under ``prefix`` (which must end with ``/``); returns the count."""
    prefix = _check_prefix(prefix)
    deleted = 0
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if not keys:
            continue
        resp = client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        if resp.get("Errors"):
            first = resp["Errors"][0]
            raise RuntimeError(f"delete under {prefix} failed for {first.get('Key')}: {first.get('Message')}")
        deleted += len(keys)
    return deleted


def _check_prefix(prefix: str) -> str:
    # An empty prefix would mean "the whole bucket"; a prefix without the trailing slash
    # would also match siblings ("snapshots/a" matches "snapshots/ab/...").
    check_key(prefix)
    if not prefix.endswith("/"):
        raise InvalidParameterValue(f"prefix {prefix!r} must end with '/'")
    return prefix


def write_manifest(
    client: Any,
    bucket: str,
    snapshot: str,
    manifest: dict[str, Any],
    *,
    extra_args: dict[str, Any] | None = None,
) -> str:
    key = manifest_key(snapshot)
    body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json", **dict(extra_args or {}))
    return key


def read_manifest(client: Any, bucket: str, snapshot: str) -> dict[str, Any]:
    key = manifest_key(snapshot)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            msg = f"Snapshot {snapshot} has no manifest in s3://{bucket}/{key}"
            raise SnapshotNotFoundFault(msg) from exc
        raise
    return json.loads(body)


def verify_object(client: Any, bucket: str, key: str, sha256: str, size: int) -> dict[str, Any]:
    """Stream the object back and recheck size and SHA-256; raises ``ChecksumMismatch``."""
    resp = client.get_object(Bucket=bucket, Key=check_key(key))
    if resp["ContentLength"] != size:
        resp["Body"].close()
        raise ChecksumMismatch(
            f"s3://{bucket}/{key}: size {resp['ContentLength']} != expected {size}",
            key=key,
            size=resp["ContentLength"],
            expected_size=size,
        )
    digest = hashlib.sha256()
    got = 0
    for chunk in resp["Body"].iter_chunks(DOWNLOAD_CHUNK):
        digest.update(chunk)
        got += len(chunk)
    actual = digest.hexdigest()
    if got != size or actual != sha256:
        raise ChecksumMismatch(
            f"s3://{bucket}/{key}: sha256 {actual} ({got} bytes) != expected {sha256} ({size} bytes)",
            key=key,
            sha256=actual,
            expected_sha256=sha256,
        )
    return {"key": key, "size": got, "sha256": actual}


def download_to_file(
    client: Any,
    bucket: str,
    key: str,
    path: str | os.PathLike[str],
    expected_sha256: str | None = None,
    on_bytes: Callable[[int], None] | None = None,
    version_id: str | None = None,
) -> dict[str, Any]:
    """Stream an object (``version_id``: that version of it) to ``path`` (a ``.part`` file renamed at the end).

    Returns ``{"size", "sha256"}``; on a checksum mismatch the partial file is removed and
    ``ChecksumMismatch`` is raised. ``on_bytes(total_so_far)`` is called after every chunk.
    """
    dest = Path(path)
    tmp = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    size = 0
    version = {"VersionId": version_id} if version_id else {}
    resp = client.get_object(Bucket=bucket, Key=check_key(key), **version)
    try:
        with open(tmp, "wb") as fh:
            for chunk in resp["Body"].iter_chunks(DOWNLOAD_CHUNK):
                digest.update(chunk)
                fh.write(chunk)
                size += len(chunk)
                if on_bytes is not None:
                    on_bytes(size)
        actual = digest.hexdigest()
        if expected_sha256 is not None and actual != expected_sha256.lower():
            raise ChecksumMismatch(
                f"s3://{bucket}/{key}: sha256 {actual} != expected {expected_sha256}",
                key=key,
                sha256=actual,
                expected_sha256=expected_sha256,
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"size": size, "sha256": actual}


class S3RangeReader:
    """An S3 object read front to back with ranged GETs, SHA-256 checked on the fly.

    ``read(n)`` returns the next ``n`` bytes (fewer only at the end). The next range is
    fetched and hashed in the background while the caller works on this one (one range
    ahead, so at most two ranges in memory; the one fetch thread takes the ranges in order,
    so the digest sees them in order, and hashlib lets the caller's thread run meanwhile).
    Reading the last byte checks the size and, when
    ``expected_sha256`` is given, the digest (``ChecksumMismatch``); ``sha256`` holds the
    digest of everything read. A changed object (ETag) between two ranges is an error too.
    ``version_id``: that version of the object; ``on_bytes(total_so_far)`` after every range.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        key: str,
        *,
        expected_sha256: str | None = None,
        range_size: int = RANGE_SIZE,
        size: int | None = None,
        version_id: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.client = client
        self._version = {"VersionId": version_id} if version_id else {}
        self._on_bytes = on_bytes
        self.bucket = bucket
        self.key = check_key(key)
        self.expected_sha256 = expected_sha256.lower() if expected_sha256 else None
        self.range_size = max(1, range_size)
        head = client.head_object(Bucket=bucket, Key=self.key, **self._version)
        self.size = int(head["ContentLength"])
        if size is not None and int(size) != self.size:
            raise ChecksumMismatch(
                f"s3://{bucket}/{key}: size {self.size} != expected {size}", key=key, size=self.size, expected_size=size
            )
        self.etag = head.get("ETag")
        self.sha256: str | None = None
        self.gets = 0
        self._digest = hashlib.sha256()
        self._fetched = 0  # bytes requested so far (ranges handed to the pool)
        self._pos = 0  # bytes handed to the caller
        self._received = 0  # bytes of the ranges taken in so far
        self._buf = b""
        self._buf_at = 0
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="s3-range")
        self._next: Future[bytes] | None = self._fetch_next()

    def __repr__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def _fetch_next(self) -> Future[bytes] | None:
        if self._fetched >= self.size or self._pool is None:
            return None
        start, end = self._fetched, min(self.size, self._fetched + self.range_size) - 1
        self._fetched = end + 1
        return self._pool.submit(self._get, start, end)

    def _get(self, start: int, end: int) -> bytes:
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self.key,
            "Range": f"bytes={start}-{end}",
            **self._version,
        }
        if self.etag:
            args["IfMatch"] = self.etag
        want = end - start + 1
        for attempt in range(RANGE_ATTEMPTS):  # bounded: a range is asked for at most RANGE_ATTEMPTS times
            self.gets += 1
            chunks: list[bytes] = []
            got, failure = 0, None
            try:
                body = self.client.get_object(**args)["Body"]
            except ClientError:  # an answer (the object changed: IfMatch, or is gone): not retried
                raise
            except Exception as exc:  # no answer: a connection refused or dropped, a timeout
                failure = exc
            else:
                try:
                    for chunk in body.iter_chunks(DOWNLOAD_CHUNK):
                        chunks.append(chunk)
                        got += len(chunk)
                except Exception as exc:  # a dropped connection, botocore's own checksum of the response
                    failure = exc
                finally:
                    body.close()
            if failure is None and got == want:
                break
            if attempt + 1 == RANGE_ATTEMPTS:
                raise self._short(start, end, got, failure) from failure
            time.sleep(RANGE_RETRY_PAUSE_S * (attempt + 1))  # a blip: the same range again, same ETag
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._digest.update(data)
        return data

    def _short(self, start: int, end: int, got: int, exc: Exception | None) -> ChecksumMismatch:
        why = f" ({type(exc).__name__}: {exc})" if exc else ""
        return ChecksumMismatch(
            f"s3://{self.bucket}/{self.key}: read {start + got} of {self.size} bytes; range "
            f"{start}-{end} returned {got} of {end - start + 1}{why}",
            key=self.key,
            size=self.size,
        )

    def read(self, n: int) -> bytes:
        parts: list[bytes] = []
        want = max(0, min(n, self.size - self._pos))
        while want:
            if self._buf_at >= len(self._buf):
                if self._next is None:
                    break
                self._buf, self._buf_at = self._next.result(), 0
                self._next = self._fetch_next()
                self._received += len(self._buf)
                if self._on_bytes is not None:
                    self._on_bytes(self._received)
            take = self._buf[self._buf_at : self._buf_at + want]
            self._buf_at += len(take)
            want -= len(take)
            parts.append(take)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._pos += len(data)
        if self._pos == self.size and self.sha256 is None:
            self._finish()
        return data

    def _finish(self) -> None:
        self.sha256 = self._digest.hexdigest()
        if self.expected_sha256 is not None and self.sha256 != self.expected_sha256:
            raise ChecksumMismatch(
                f"s3://{self.bucket}/{self.key}: sha256 {self.sha256} != expected {self.expected_sha256}",
                key=self.key,
                sha256=self.sha256,
                expected_sha256=self.expected_sha256,
            )

    def read_all(self) -> int:
        """Read (and check) the rest of the object, discarding it; returns the bytes read."""
        total = 0
        while chunk := self.read(self.range_size):
            total += len(chunk)
        return total

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._next = None
        self._buf = b""

    def __enter__(self) -> S3RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
