"""S3 layout, multipart writer, manifest and checksum helpers against moto's S3."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from cachevault.catalog import storage
from cachevault.catalog.storage import MiB, S3MultipartWriter
from cachevault.core.errors import ChecksumMismatch, InvalidParameterValue, SnapshotNotFoundFault
from moto import mock_aws

BUCKET = "cv-unit-snapshots"
PART = 5 * MiB


@pytest.fixture
def s3() -> Iterator[Any]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


class Recording:
    """Delegates to a real client; counts calls, can fail or slow down upload_part."""

    def __init__(self, client: Any, *, fail_on_part: int | None = None, delay: float = 0.0) -> None:
        self._client = client
        self.fail_on_part = fail_on_part
        self.delay = delay
        self.calls: dict[str, int] = {}
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)

        return call

    def upload_part(self, **kwargs: Any) -> Any:
        with self._lock:
            self.calls["upload_part"] = self.calls.get("upload_part", 0) + 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            if kwargs["PartNumber"] == self.fail_on_part:
                raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, "UploadPart")
            return self._client.upload_part(**kwargs)
        finally:
            with self._lock:
                self.active -= 1


def _chunks(data: bytes, size: int) -> Iterator[memoryview]:
    view = memoryview(data)
    for i in range(0, len(data), size):
        yield view[i : i + size]


def _no_leftovers(s3: Any, key: str) -> None:
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount") == 0


# -- layout ---------------------------------------------------------------------------


def test_layout_follows_elasticache_export_naming() -> None:
    assert storage.rdb_key("nightly", 1) == "snapshots/nightly/nightly-0001.rdb"
    assert storage.rdb_key("automatic.c1-2024-01-02-03-04", 12) == (
        "snapshots/automatic.c1-2024-01-02-03-04/automatic.c1-2024-01-02-03-04-0012.rdb"
    )
    assert storage.manifest_key("nightly") == "snapshots/nightly/manifest.json"


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "/abs", ".hidden", "a..b", "x\ny", "a b"])
def test_names_that_could_escape_the_prefix_are_refused(name: str) -> None:
    with pytest.raises(InvalidParameterValue):
        storage.rdb_key(name, 1)
    with pytest.raises(InvalidParameterValue):
        storage.manifest_key(name)


@pytest.mark.parametrize("index", [0, -1, 10_000, True])
def test_shard_index_is_one_based_four_digits(index: int) -> None:
    with pytest.raises(InvalidParameterValue):
        storage.rdb_key("snap", index)


@pytest.mark.parametrize("key", ["", "/snapshots/a", "snapshots/../x", "snapshots/./x"])
def test_writer_refuses_escaping_keys(key: str) -> None:
    with pytest.raises(InvalidParameterValue):
        S3MultipartWriter(object(), BUCKET, key)


# -- multipart writer -------------------------------------------------------------------


def test_multipart_upload_in_several_parts_with_extra_args(s3: Any) -> None:
    data = os.urandom(2 * PART + PART // 2 + 123)
    key = storage.rdb_key("multi", 1)
    client = Recording(s3)
    with S3MultipartWriter(client, BUCKET, key, part_size=PART, extra_args={"ServerSideEncryption": "AES256"}) as w:
        for chunk in _chunks(data, 777_777):  # chunks straddle part boundaries
            w.write(chunk)
        result = w.close()
    assert result["parts"] == 3 and result["multipart"] is True and result["size"] == len(data)
    assert client.calls["upload_part"] == 3 and client.calls["complete_multipart_upload"] == 1
    head = s3.head_object(Bucket=BUCKET, Key=key)
    assert head["ContentLength"] == len(data)
    assert head["ServerSideEncryption"] == "AES256"
    assert head["ETag"] == result["etag"] and result["etag"].strip('"').endswith("-3")
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data


def test_exact_multiple_of_part_size(s3: Any) -> None:
    data = os.urandom(2 * PART)
    with S3MultipartWriter(s3, BUCKET, "snapshots/exact/exact-0001.rdb", part_size=PART) as w:
        w.write(data)
        result = w.close()
    assert result["parts"] == 2
    assert s3.get_object(Bucket=BUCKET, Key="snapshots/exact/exact-0001.rdb")["Body"].read() == data


@pytest.mark.parametrize("size", [0, 1, PART - 1])
def test_small_objects_use_a_single_put(s3: Any, size: int) -> None:
    data = os.urandom(size)
    key = f"snapshots/small/small-{size}.rdb"
    client = Recording(s3)
    with S3MultipartWriter(client, BUCKET, key, part_size=PART) as w:
        w.write(data)
    assert "create_multipart_upload" not in client.calls
    assert client.calls["put_object"] == 1
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data
    assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_upload_error_aborts_and_surfaces(s3: Any) -> None:
    key = storage.rdb_key("broken", 1)
    client = Recording(s3, fail_on_part=2)
    w = S3MultipartWriter(client, BUCKET, key, part_size=PART, max_in_flight=1)
    with pytest.raises(ClientError, match="injected"), w:
        for chunk in _chunks(os.urandom(6 * PART), MiB):
            w.write(chunk)
        w.close()
    assert w.upload_id is not None  # the multipart upload existed and was aborted
    assert client.calls["abort_multipart_upload"] == 1
    # the failure stopped the producer early: not every part was attempted
    assert client.calls["upload_part"] < 6
    _no_leftovers(s3, key)
    with pytest.raises(ValueError, match="aborted"):
        w.write(b"more")


def test_error_in_the_producer_aborts_via_context_manager(s3: Any) -> None:
    key = storage.rdb_key("interrupted", 1)
    with (
        pytest.raises(RuntimeError, match="capture died"),
        S3MultipartWriter(s3, BUCKET, key, part_size=PART) as w,
    ):
        w.write(os.urandom(PART + 10))
        raise RuntimeError("capture died")
    assert w.upload_id is not None
    _no_leftovers(s3, key)


def test_backpressure_bounds_memory_and_concurrency(s3: Any) -> None:
    data = os.urandom(8 * PART)
    key = storage.rdb_key("bounded", 1)
    client = Recording(s3, delay=0.15)
    w = S3MultipartWriter(client, BUCKET, key, part_size=PART, max_in_flight=2)
    started = time.monotonic()
    for chunk in _chunks(data, MiB):
        w.write(chunk)
    write_time = time.monotonic() - started
    result = w.close()
    assert result["parts"] == 8
    assert client.max_active <= 2
    assert w.peak_buffered <= 3 * PART
    # The producer had to wait for slots: 8 slow parts, 2 at a time, 6 of them before
    # the last write returned, means at least ~3 upload rounds of waiting.
    assert write_time >= 2 * 0.15
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data


def test_abort_incomplete_uploads_only_under_prefix(s3: Any) -> None:
    mine = [s3.create_multipart_upload(Bucket=BUCKET, Key=f"snapshots/a/a-000{i}.rdb") for i in (1, 2)]
    other = s3.create_multipart_upload(Bucket=BUCKET, Key="snapshots/ab/ab-0001.rdb")
    assert storage.abort_incomplete_uploads(s3, BUCKET, "snapshots/a/") == 2
    left = s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert [u["UploadId"] for u in left] == [other["UploadId"]]
    assert all(m["UploadId"] not in {u["UploadId"] for u in left} for m in mine)


def test_delete_prefix_spares_siblings_and_refuses_wide_prefixes(s3: Any) -> None:
    for key in ("snapshots/a/a-0001.rdb", "snapshots/a/manifest.json", "snapshots/ab/ab-0001.rdb"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    assert storage.delete_prefix(s3, BUCKET, "snapshots/a/") == 2
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert keys == ["snapshots/ab/ab-0001.rdb"]
    for bad in ("", "snapshots", "/snapshots/", "snapshots/../"):
        with pytest.raises(InvalidParameterValue):
            storage.delete_prefix(s3, BUCKET, bad)


# -- manifest, verification, download -----------------------------------------------------


def test_manifest_roundtrip_and_missing(s3: Any) -> None:
    manifest = {"snapshot": "m1", "shards": [{"index": 1, "sha256": "ab" * 32, "size": 10}]}
    key = storage.write_manifest(s3, BUCKET, "m1", manifest)
    assert key == "snapshots/m1/manifest.json"
    assert storage.read_manifest(s3, BUCKET, "m1") == manifest
    assert s3.head_object(Bucket=BUCKET, Key=key)["ContentType"] == "application/json"
    with pytest.raises(SnapshotNotFoundFault):
        storage.read_manifest(s3, BUCKET, "nope")


def test_verify_object_rechecks_sha256_and_size(s3: Any) -> None:
    data = os.urandom(3 * MiB + 5)
    sha = hashlib.sha256(data).hexdigest()
    s3.put_object(Bucket=BUCKET, Key="snapshots/v/v-0001.rdb", Body=data)
    ok = storage.verify_object(s3, BUCKET, "snapshots/v/v-0001.rdb", sha, len(data))
    assert ok == {"key": "snapshots/v/v-0001.rdb", "size": len(data), "sha256": sha}
    with pytest.raises(ChecksumMismatch, match="sha256"):
        storage.verify_object(s3, BUCKET, "snapshots/v/v-0001.rdb", "0" * 64, len(data))
    with pytest.raises(ChecksumMismatch, match="size"):
        storage.verify_object(s3, BUCKET, "snapshots/v/v-0001.rdb", sha, len(data) + 1)


def test_download_to_file_streams_and_checks(s3: Any, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + 77)
    sha = hashlib.sha256(data).hexdigest()
    s3.put_object(Bucket=BUCKET, Key="snapshots/d/d-0001.rdb", Body=data)
    dest = tmp_path / "d.rdb"
    got = storage.download_to_file(s3, BUCKET, "snapshots/d/d-0001.rdb", dest, expected_sha256=sha)
    assert got == {"size": len(data), "sha256": sha}
    assert dest.read_bytes() == data
    bad = tmp_path / "bad.rdb"
    with pytest.raises(ChecksumMismatch):
        storage.download_to_file(s3, BUCKET, "snapshots/d/d-0001.rdb", bad, expected_sha256="f" * 64)
    assert not bad.exists() and not (tmp_path / "bad.rdb.part").exists()
