"""Replication-protocol capture against real redis-server 7.0 processes.

A primary and a diskless replica hold ~30 MB of seeded, incompressible mixed data
(strings with TTLs, hashes, lists, sets, zsets, streams with groups, a function
library). The capture runs against the replica, into a file and into S3 (moto).
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from cachevault.catalog import storage
from cachevault.catalog.storage import MiB, S3MultipartWriter
from cachevault.core.errors import CaptureFailed
from cachevault.snapshot import capture as capture_mod
from cachevault.snapshot.capture import CaptureProgress, capture_rdb
from cachevault_tools import datagen
from cachevault_tools.bench.capture import wait_replica_synced
from cachevault_tools.local.redis_process import RedisProcess, free_port, start_node
from moto import mock_aws

CHECK_RDB = "/usr/bin/redis-check-rdb"
DATASET_MB = 30
BUCKET = "cv-capture-test"
DISKLESS = {"repl-diskless-sync": "yes", "repl-diskless-sync-delay": 0}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisProcess, RedisProcess]]:
    base = tmp_path_factory.mktemp("capture")
    nodes: list[RedisProcess] = []
    try:
        primary = start_node(base / "primary", config=DISKLESS)
        nodes.append(primary)
        datagen.generate(primary.host, primary.port, DATASET_MB, seed=7)
        replica = start_node(base / "replica", config={**DISKLESS, "replicaof": f"{primary.host} {primary.port}"})
        nodes.append(replica)
        wait_replica_synced(primary.endpoint, replica.endpoint, 60)
        yield primary, replica
    finally:
        for node in reversed(nodes):
            node.stop()


def _persistence_counters(node: RedisProcess) -> dict[str, int]:
    c = node.client()
    try:
        persistence, stats = c.info("persistence"), c.info("stats")
    finally:
        c.close()
    return {
        "rdb_saves": persistence["rdb_saves"],
        "latest_fork_usec": stats["latest_fork_usec"],
        "total_forks": stats["total_forks"],
    }


def _file_identity(path: Path) -> tuple[int, int, int, str]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size, hashlib.sha256(path.read_bytes()).hexdigest()


def _check_rdb(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHECK_RDB, str(path)], capture_output=True, text=True, timeout=60, check=False)


def _digest_and_size(node: RedisProcess) -> tuple[int, str, Any]:
    c = node.client()
    try:
        libs = c.execute_command("FUNCTION", "LIST")
        # FUNCTION LIST order is hash-table order: compare as a sorted structure.
        functions = sorted(
            (lib[b"library_name"], fn[b"name"], tuple(fn[b"flags"])) for lib in libs for fn in lib[b"functions"]
        )
        return c.dbsize(), c.execute_command("DEBUG", "DIGEST"), functions
    finally:
        c.close()


class _Writer(threading.Thread):
    """Keeps writing to the primary while a capture runs; records any error."""

    def __init__(self, node: RedisProcess) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.stop_event = threading.Event()
        self.writes = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        c = self.node.client(timeout=10)
        try:
            for i in range(1_000_000):  # bounded; stopped by the event long before
                if self.stop_event.is_set():
                    break
                c.set(f"live:{i % 5000}", i.to_bytes(8, "little") * 64)
                self.writes += 1
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            c.close()

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)
        assert not self.is_alive()


def test_capture_to_file_is_a_faithful_rdb_and_costs_the_primary_no_fork(
    pair: tuple[RedisProcess, RedisProcess], tmp_path: Path
) -> None:
    primary, replica = pair
    before = _persistence_counters(primary)
    replica_dump = replica.data_dir / "dump.rdb"
    dump_before = _file_identity(replica_dump) if replica_dump.exists() else None
    source = _digest_and_size(primary)
    reports: list[CaptureProgress] = []

    out = tmp_path / "captured.rdb"
    with open(out, "wb") as fh:
        result = capture_rdb(replica.host, replica.port, fh, progress=reports.append, chunk_size=256 * 1024)

    data = out.read_bytes()
    assert result.size == len(data) > DATASET_MB * MiB
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.mode == "diskless"
    assert data[:9] == b"REDIS0010" and result.rdb_version == 10
    assert result.crc64 == int.from_bytes(data[-8:], "little") != 0 and result.crc64_verified
    repl = replica.client().info("replication")
    assert result.replid == repl["master_replid"]
    # Only the primary's periodic PINGs may have moved the offset since the fork.
    assert result.repl_offset is not None and 0 <= repl["master_repl_offset"] - result.repl_offset < 1000
    assert result.notes == []
    assert reports and reports[-1].bytes == result.size and reports[-1].rate_bps > 0
    assert len(reports) <= 2 * result.duration_s + 2  # throttled to ~2 reports a second

    check = _check_rdb(out)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "RDB looks OK" in check.stdout

    # The replica forked, the primary did not; the replica's own dump.rdb is untouched.
    assert _persistence_counters(primary) == before
    if dump_before is None:
        assert not replica_dump.exists()
    else:
        assert _file_identity(replica_dump) == dump_before

    # A server started on the captured file holds exactly the source dataset.
    loaded = start_node(tmp_path / "loaded", rdb_file=out)
    try:
        assert _digest_and_size(loaded) == source
        assert source[0] > 1000 and source[2]  # non-trivial data set, functions included
    finally:
        loaded.stop()


def test_capture_to_s3_while_the_primary_takes_writes(pair: tuple[RedisProcess, RedisProcess], tmp_path: Path) -> None:
    primary, replica = pair
    before = _persistence_counters(primary)
    key = storage.rdb_key("live-capture", 1)
    writer = _Writer(primary)
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        writer.start()
        try:
            with S3MultipartWriter(
                s3, BUCKET, key, part_size=5 * MiB, extra_args={"ServerSideEncryption": "AES256"}
            ) as sink:
                result = capture_rdb(replica.host, replica.port, sink)
                upload = sink.close()
        finally:
            writer.finish()
        assert writer.errors == [] and writer.writes > 0
        assert upload["multipart"] and upload["parts"] >= 6 and upload["size"] == result.size

        head = s3.head_object(Bucket=BUCKET, Key=key)
        assert head["ContentLength"] == result.size
        checked = storage.verify_object(s3, BUCKET, key, result.sha256, result.size)
        assert checked["sha256"] == result.sha256
        local = tmp_path / "from-s3.rdb"
        storage.download_to_file(s3, BUCKET, key, local, expected_sha256=result.sha256)
        assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []

    check = _check_rdb(local)
    assert check.returncode == 0, check.stdout + check.stderr
    assert _persistence_counters(primary) == before


def test_sync_without_psync_and_disk_based_transfer(tmp_path: Path) -> None:
    # A node with disk-based replication answers "$<len>": the other framing.
    node = start_node(tmp_path / "disk", config={"repl-diskless-sync": "no"})
    try:
        c = node.client()
        c.mset({f"k{i}": f"v{i}" for i in range(500)})
        c.rpush("l", *range(100))
        chunks: list[bytes] = []
        result = capture_rdb(node.host, node.port, lambda b: chunks.append(bytes(b)), use_psync=False)
        data = b"".join(chunks)
        assert result.mode == "disk" and result.replid is None and result.repl_offset is None
        assert result.size == len(data) and result.sha256 == hashlib.sha256(data).hexdigest()
        assert result.crc64_verified
        out = tmp_path / "disk.rdb"
        out.write_bytes(data)
        assert _check_rdb(out).returncode == 0
        loaded = start_node(tmp_path / "disk-loaded", rdb_file=out)
        try:
            assert loaded.client().dbsize() == 501
        finally:
            loaded.stop()
    finally:
        node.stop()


def test_minimal_acl_user_and_bad_password(tmp_path: Path) -> None:
    node = start_node(tmp_path / "acl")
    try:
        c = node.client()
        c.execute_command(
            "ACL", "SETUSER", "capture", "on", ">s3cret", "-@all", "+replconf", "+sync", "+psync", "+ping"
        )
        c.set("a", "1")
        sink = bytearray()
        result = capture_rdb(node.host, node.port, sink.extend, username="capture", password="s3cret")
        assert result.size == len(sink) and sink.startswith(b"REDIS")
        with pytest.raises(CaptureFailed, match="AUTH"):
            capture_rdb(node.host, node.port, sink.extend, username="capture", password="wrong")
    finally:
        node.stop()


def test_replica_without_master_link_fails_with_nomasterlink(tmp_path: Path) -> None:
    # Its master's port has nobody listening: the link never comes up.
    orphan = start_node(tmp_path / "orphan", config={**DISKLESS, "replicaof": f"127.0.0.1 {free_port()}"})
    try:
        with pytest.raises(CaptureFailed, match="NOMASTERLINK") as err:
            capture_rdb(orphan.host, orphan.port, lambda b: None)
        assert err.value.details["node"] == f"{orphan.host}:{orphan.port}"
    finally:
        orphan.stop()


def test_replica_killed_mid_stream_leaves_nothing_in_s3(
    pair: tuple[RedisProcess, RedisProcess], tmp_path: Path
) -> None:
    primary, _ = pair
    victim = start_node(tmp_path / "victim", config={**DISKLESS, "replicaof": f"{primary.host} {primary.port}"})
    key = storage.rdb_key("killed", 1)
    try:
        wait_replica_synced(primary.endpoint, victim.endpoint, 60)
        with mock_aws():
            s3 = boto3.client("s3", region_name="us-east-1")
            s3.create_bucket(Bucket=BUCKET)
            writer = S3MultipartWriter(s3, BUCKET, key, part_size=5 * MiB)
            seen = 0

            def sink(chunk: memoryview) -> None:
                nonlocal seen
                writer.write(chunk)
                seen += len(chunk)
                if seen >= 6 * MiB and victim.alive():
                    victim.kill()  # SIGKILL: no goodbye on the socket

            with pytest.raises(CaptureFailed, match=r"after \d+ bytes") as err, writer:
                capture_rdb(victim.host, victim.port, sink, read_timeout=20)
            assert err.value.details["received"] >= 6 * MiB
            assert writer.upload_id is not None  # a part had been uploaded before the abort
            assert s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
            assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount") == 0
    finally:
        with contextlib.suppress(redis.RedisError):
            victim.stop()
    assert not victim.alive()


def test_unreachable_node_fails_fast() -> None:
    # A port bound but never listening refuses connections, and no other process can take it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        started = time.monotonic()
        with pytest.raises(CaptureFailed, match="cannot connect"):
            capture_rdb("127.0.0.1", held.getsockname()[1], lambda b: None, connect_timeout=2)
        assert time.monotonic() - started < 5


def test_keepalives_and_tiny_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A 1 s diskless delay makes the node send bare "\n" keepalives before the payload;
    # 13-byte reads put the 40-byte EOF marker across many reads.
    node = start_node(tmp_path / "slow", config={"repl-diskless-sync-delay": 1})
    lines: list[bytes] = []
    real_readline = capture_mod._Conn.readline

    def spy(self: Any) -> bytes:
        line = real_readline(self)
        lines.append(line)
        return line

    monkeypatch.setattr(capture_mod._Conn, "readline", spy)
    try:
        c = node.client()
        c.mset({f"k{i}": bytes(range(256)) * (i % 7 + 1) for i in range(300)})
        out = tmp_path / "tiny.rdb"
        with open(out, "wb") as fh:
            result = capture_rdb(node.host, node.port, fh, chunk_size=13)
        assert b"" in lines  # keepalives were seen and skipped
        assert result.mode == "diskless" and result.crc64_verified
        assert result.size == out.stat().st_size
        assert result.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
        assert _check_rdb(out).returncode == 0
    finally:
        node.stop()


def test_rdb_checks_on_real_payloads(tmp_path: Path) -> None:
    node = start_node(tmp_path / "crc")
    try:
        c = node.client()
        c.mset({f"k{i}": f"value-{i}" * 10 for i in range(200)})
        sink = bytearray()
        capture_rdb(node.host, node.port, sink.extend)
        rdb = bytes(sink)

        def check(data: bytes, step: int) -> tuple[int, int, bool]:
            checker = capture_mod._PayloadChecker("n")
            for i in range(0, len(data), step):
                checker.feed(memoryview(data[i : i + step]))
            return checker.finish()

        # Any chunking, even 1 byte at a time, finds the same trailer.
        expected = (10, int.from_bytes(rdb[-8:], "little"), True)
        for step in (1, 5, 8, 9, 4096):
            assert check(rdb, step) == expected
        corrupt = bytearray(rdb)
        corrupt[len(rdb) // 2] ^= 0xFF
        with pytest.raises(CaptureFailed, match="CRC64 mismatch"):
            check(bytes(corrupt), 1000)
        with pytest.raises(CaptureFailed, match="not an RDB"):
            check(b"RADIS0010" + rdb[9:], 3)
        with pytest.raises(CaptureFailed, match="too short"):
            check(rdb[:12], 4)

    finally:
        node.stop()
    # rdbchecksum no (immutable at runtime): a zero trailer, nothing to verify.
    unchecked = start_node(tmp_path / "nocrc", config={"rdbchecksum": "no"})
    try:
        unchecked.client().set("k", "v")
        result = capture_rdb(unchecked.host, unchecked.port, lambda b: None)
        assert result.crc64 == 0 and result.crc64_verified is False and result.rdb_version == 10
    finally:
        unchecked.stop()
