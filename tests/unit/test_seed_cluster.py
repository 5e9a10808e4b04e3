"""restore.seed_cluster.load against a real redis-server: the FIFO, DEBUG RELOAD over the unix
socket, and what the seed says when the server will not or cannot load."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cachevault.rdb.reader import RdbFile
from cachevault.restore import seed_cluster
from cachevault.restore.seed import SeedFailed
from rdbgen import REDIS_SERVER, enc_str, rdb_file

PLAN = {"Slots": "0-16383", "RdbVersion": 10}


@pytest.fixture
def node_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "volume"
    work.mkdir()
    monkeypatch.chdir(work)  # the seed works in the node's working dir (the shared volume)
    return work


@contextlib.contextmanager
def _node(work: Path, *extra: str) -> Iterator[redis.Redis]:
    args = [REDIS_SERVER, "--port", "0", "--save", "", "--appendonly", "no", "--cluster-enabled", "yes",
            *seed_cluster.node_arguments(), "--logfile", str(work.parent / "node.log"), *extra]  # fmt: skip
    proc = subprocess.Popen(args, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Relative, as the seed's: the test runs in the volume (a unix socket path has 107 bytes at most).
    conn = redis.Redis(unix_socket_path=seed_cluster.NODE_SOCKET, password="pw", socket_timeout=10)
    try:
        deadline = time.monotonic() + 10
        while True:  # bounded: answering, or the test fails
            try:
                conn.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
                time.sleep(0.01)
        yield conn
    finally:
        conn.close()
        proc.terminate()
        proc.wait(timeout=10)


def _source(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "source.rdb"
    path.write_bytes(rdb_file(10, body))
    return path


def test_a_node_loads_its_slots_through_the_fifo(tmp_path: Path, node_dir: Path) -> None:
    source = _source(tmp_path, b"\xfe\x00" + b"".join(b"\x00" + enc_str(b"k%d" % i) + enc_str(b"v") for i in range(50)))
    with _node(node_dir, "--requirepass", "pw", "--enable-debug-command", "local") as conn:
        stats = seed_cluster.load({**PLAN, "Slots": "0-8191"}, {"Password": "pw"}, [lambda: RdbFile(source)])
        assert conn.dbsize() == stats.keys > 0 and stats.keys_elsewhere == 50 - stats.keys
        assert not (node_dir / seed_cluster.LOAD_FILE).exists()  # the FIFO went with the load


def test_a_server_that_refuses_debug_is_reported_not_waited_for(tmp_path: Path, node_dir: Path) -> None:
    source = _source(tmp_path, b"\xfe\x00\x00" + enc_str(b"k") + enc_str(b"v"))
    with _node(node_dir, "--requirepass", "pw", "--enable-debug-command", "no") as conn:
        with pytest.raises(SeedFailed, match="DEBUG RELOAD with -ERR"):
            seed_cluster.load(PLAN, {"Password": "pw"}, [lambda: RdbFile(source)])
        assert conn.dbsize() == 0
        assert not (node_dir / seed_cluster.LOAD_FILE).exists()


def test_a_wrong_password_is_reported(tmp_path: Path, node_dir: Path) -> None:
    source = _source(tmp_path, b"\xfe\x00\x00" + enc_str(b"k") + enc_str(b"v"))
    with _node(node_dir, "--requirepass", "pw"):
        with pytest.raises(SeedFailed, match="answered AUTH with -WRONGPASS"):
            seed_cluster.load(PLAN, {"Password": "nope"}, [lambda: RdbFile(source)])
        assert not (node_dir / seed_cluster.LOAD_FILE).exists()


def test_a_source_that_breaks_midway_never_completes_the_load(tmp_path: Path, node_dir: Path) -> None:
    good = _source(tmp_path, b"\xfe\x00" + b"".join(b"\x00" + enc_str(b"k%d" % i) + enc_str(b"v") for i in range(20)))

    def broken() -> RdbFile:
        raise OSError("the range GET failed")

    with _node(node_dir, "--requirepass", "pw", "--enable-debug-command", "local") as conn:
        with pytest.raises(OSError, match="range GET failed"):
            seed_cluster.load(PLAN, {"Password": "pw"}, [lambda: RdbFile(good), broken])
        # The server read a stream without its EOF and trailer: its DEBUG RELOAD failed, and it
        # is alive (a restore that fails tears the node down anyway).
        assert conn.ping()
        assert not (node_dir / seed_cluster.LOAD_FILE).exists()
