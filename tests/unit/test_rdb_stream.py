"""RdbStream (the RDB read as a stream, through a moving window) against RdbFile on the same bytes,
and storage.S3RangeReader (ranged GETs, SHA-256 on the fly) against moto's S3."""

from __future__ import annotations

import hashlib
import io
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.response import StreamingBody
from cachevault.catalog import storage
from cachevault.core.errors import ChecksumMismatch, RdbFormatError
from cachevault.rdb.reader import RdbAux, RdbFile, RdbFunction, RdbKey, RdbModuleSkipped, RdbStream, scan_rdb
from moto import mock_aws
from rdbgen import redis_server

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rdb"
BUCKET = "cv-unit-stream"


class BytesSource:
    """A ByteSource over bytes in memory, read front to back (what S3RangeReader is to S3)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.pos = 0
        self.reads = 0
        self.closed = False

    def read(self, n: int) -> bytes:
        self.reads += 1
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed = True


def _items(reader: RdbFile) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    with reader:
        for item in reader:
            if isinstance(item, RdbKey):
                out.append(("key", item.db, item.key, item.type_byte, bytes(item.value), item.expire_ms,
                            item.offset, item.idle, item.freq))  # fmt: skip
                item.value.release()
            elif isinstance(item, RdbAux):
                out.append(("aux", item.name, item.value))
            elif isinstance(item, RdbFunction):
                out.append(("function", item.code))
            elif isinstance(item, RdbModuleSkipped):
                out.append(("module", item.db, item.key, item.module_name, item.offset))
        assert reader.complete and reader.checksum_ok
    return out


@pytest.fixture(scope="module")
def dump(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real redis-server dump: every common type, 3 databases, TTLs, a function, a 300 KB value."""
    rnd = random.Random(3)
    with redis_server(tmp_path_factory.mktemp("stream-src")) as server:
        c0, c2 = server.db(0), server.db(2)
        for i in range(300):
            c0.set(f"s:{i}", rnd.randbytes(rnd.randrange(1, 400)), px=None if i % 3 else 3_600_000)
        c0.rpush("list", *[f"e{i}" for i in range(3000)])
        c0.hset("hash", mapping={f"f{i}": f"v{i}" * 5 for i in range(500)})
        c0.zadd("zset", {f"m{i}": i / 3 for i in range(300)})
        c0.sadd("set", *range(1000))
        c0.xadd("stream", {"a": 1})
        c0.set("big", rnd.randbytes(300_000))  # bigger than most windows below
        c2.set("other-db", "x")
        server.client.execute_command(
            "FUNCTION", "LOAD", "#!lua name=lib\n redis.register_function('f', function() return 1 end)"
        )
        path = server.save()
        copy = tmp_path_factory.mktemp("stream-dump") / "dump.rdb"
        copy.write_bytes(path.read_bytes())
        return copy


@pytest.mark.parametrize("window", [1, 7, 4096, 65_536, 1 << 22])
def test_stream_reads_what_the_file_reads(dump: Path, window: int) -> None:
    data = dump.read_bytes()
    source = BytesSource(data)
    expected = _items(RdbFile(dump))
    assert _items(RdbStream(source, window=window)) == expected
    assert source.pos == len(data) and source.closed
    if window < len(data):
        assert source.reads > 1  # the window moved
    assert any(k[0] == "key" and k[2] == b"big" for k in expected)


@pytest.mark.parametrize("fixture", ["valkey8_cluster_v11.rdb"])
def test_stream_summary_equals_file_summary(fixture: str) -> None:
    path = FIXTURES / fixture
    from_file = scan_rdb(path)
    from_stream = scan_rdb(BytesSource(path.read_bytes()))
    assert from_stream == from_file
    assert from_stream.total_keys > 0


def test_stream_memory_is_one_window(dump: Path) -> None:
    data = dump.read_bytes() * 1  # the dump itself; the window is far smaller
    tracemalloc.start()
    try:
        with RdbStream(BytesSource(data), window=16_384) as rdb:
            for item in rdb:
                if isinstance(item, RdbKey):
                    item.value.release()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # One window, or one record when a record is bigger (the 300 KB value), plus slack.
    assert peak < 2 * 310_000 + 200_000, peak


@pytest.mark.parametrize("cut", [0.2, 0.5, 0.9, -9, -1])
def test_stream_truncated(dump: Path, cut: float) -> None:
    data = dump.read_bytes()
    n = int(len(data) * cut) if cut > 0 else len(data) + int(cut)
    with pytest.raises(RdbFormatError, match=r"truncated|ended"), RdbStream(BytesSource(data[:n]), window=4096) as rdb:
        for _ in rdb:
            pass


def test_stream_flipped_byte_and_trailing_garbage(dump: Path) -> None:
    data = bytearray(dump.read_bytes())
    data[len(data) - 20] ^= 0x5A
    with pytest.raises(RdbFormatError, match=r"offset \d+"):
        scan_rdb(BytesSource(bytes(data)))
    with pytest.raises(RdbFormatError, match="after the RDB end"):
        scan_rdb(BytesSource(dump.read_bytes() + b"junk"))


# ------------------------------------------------------------------------ S3RangeReader
@pytest.fixture
def s3() -> Iterator[Any]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def test_range_reader_streams_and_checks(s3: Any, dump: Path) -> None:
    data = dump.read_bytes()
    s3.put_object(Bucket=BUCKET, Key="x/dump.rdb", Body=data)
    digest = hashlib.sha256(data).hexdigest()
    reader = storage.S3RangeReader(s3, BUCKET, "x/dump.rdb", expected_sha256=digest, range_size=50_000)
    summary = scan_rdb(reader)
    assert summary == scan_rdb(dump)
    assert reader.sha256 == digest
    assert reader.gets == -(-len(data) // 50_000)  # one GET per range, no more


def test_range_reader_refuses_other_bytes(s3: Any, dump: Path) -> None:
    data = dump.read_bytes()
    s3.put_object(Bucket=BUCKET, Key="x/dump.rdb", Body=data)
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ChecksumMismatch, match="sha256"):
        scan_rdb(storage.S3RangeReader(s3, BUCKET, "x/dump.rdb", expected_sha256=wrong, range_size=100_000))
    with pytest.raises(ChecksumMismatch, match="size"):
        storage.S3RangeReader(s3, BUCKET, "x/dump.rdb", size=len(data) + 1)


class _DroppingClient:
    """Moto's S3 client, except that the first GET of each range named in ``drop`` is cut short."""

    def __init__(self, s3: Any, drop: set[int]) -> None:
        self.s3, self.drop, self.calls = s3, set(drop), 0

    def head_object(self, **kwargs: Any) -> Any:
        return self.s3.head_object(**kwargs)

    def get_object(self, **kwargs: Any) -> Any:
        self.calls += 1
        start = int(kwargs["Range"].removeprefix("bytes=").split("-")[0])
        answer = self.s3.get_object(**kwargs)
        if start in self.drop:
            self.drop.discard(start)
            whole = answer["Body"].read()
            answer["Body"] = StreamingBody(io.BytesIO(whole[: len(whole) // 2]), len(whole) // 2)
        return answer


def test_range_reader_asks_again_for_a_range_cut_short(s3: Any, dump: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(storage, "RANGE_RETRY_PAUSE_S", 0.0)
    data = dump.read_bytes()
    s3.put_object(Bucket=BUCKET, Key="x/dump.rdb", Body=data)
    digest = hashlib.sha256(data).hexdigest()
    client = _DroppingClient(s3, {0, 100_000})
    reader = storage.S3RangeReader(client, BUCKET, "x/dump.rdb", expected_sha256=digest, range_size=100_000)
    assert scan_rdb(reader) == scan_rdb(dump) and reader.sha256 == digest
    assert client.calls == -(-len(data) // 100_000) + 2  # the two ranges cut short were asked for twice


def test_range_reader_gives_up_on_a_range_always_cut_short(s3: Any, dump: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(storage, "RANGE_RETRY_PAUSE_S", 0.0)
    s3.put_object(Bucket=BUCKET, Key="x/dump.rdb", Body=dump.read_bytes())

    class Always(_DroppingClient):
        def get_object(self, **kwargs: Any) -> Any:
            self.drop.add(0)
            return super().get_object(**kwargs)

    client = Always(s3, set())
    with pytest.raises(ChecksumMismatch, match="returned"):
        scan_rdb(storage.S3RangeReader(client, BUCKET, "x/dump.rdb", range_size=100_000))
    assert client.calls == storage.RANGE_ATTEMPTS
