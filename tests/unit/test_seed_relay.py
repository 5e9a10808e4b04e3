"""restore.cutter streaming to restore.seed_relay against a real redis-server: the token, the
FIFO load, and what the cutter hears when the node will not or cannot load."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cachevault.rdb import cut as rdb_cut
from cachevault.rdb.reader import RdbFile
from cachevault.restore import cutter, seed_cluster, seed_relay
from cachevault.restore.seed import SeedFailed
from cachevault_tools.local.redis_process import process_alive
from rdbgen import enc_str, rdb_file
from test_seed_cluster import _node
from test_seed_cluster import node_dir as node_dir  # the fixture, shared

TOKEN = "0123456789abcdef" * 3


def _address() -> str:
    """A loopback address whose relay port is free (other suites run at the same time)."""
    for _ in range(100):  # bounded
        address = f"127.{random.randint(16, 250)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        with socket.socket() as probe:
            try:
                probe.bind((address, seed_relay.RELAY_PORT))
                return address
            except OSError:
                continue
    raise AssertionError("no free loopback address")


class _Relay:
    """seed_relay.relay in a thread, as the seed container runs it."""

    def __init__(self, auth: dict[str, Any]) -> None:
        self.listening = threading.Event()
        self.result: Any = None
        self.relayed = 0
        self.thread = threading.Thread(target=self._run, args=(auth,), daemon=True)
        self.thread.start()

    def _run(self, auth: dict[str, Any]) -> None:
        try:
            self.result = seed_relay.relay(TOKEN, auth, on_listening=lambda _port: self.listening.set(),
                                           on_bytes=self._count, timeout_s=30)  # fmt: skip
        except Exception as exc:  # the test reads it
            self.result = exc
        self.listening.set()

    def _count(self, relayed: int) -> None:
        self.relayed = relayed

    def done(self) -> Any:
        self.thread.join(60)
        assert not self.thread.is_alive()
        return self.result


@contextlib.contextmanager
def _links(address: str, relay: _Relay) -> Iterator[list[cutter.RelayLink]]:
    assert relay.listening.wait(30)
    links = cutter.connect([("node-1", address)], TOKEN, lambda: {"node-1"}, time.monotonic() + 30, iter([0.05] * 600))
    yield links


def _source(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "source.rdb"
    records = b"".join(b"\x00" + enc_str(b"k%d" % i) + enc_str(b"v") for i in range(n))
    path.write_bytes(rdb_file(10, b"\xfe\x00" + records))
    return path


def test_the_cutter_loads_a_node_through_its_seed_and_strangers_get_nothing(tmp_path: Path, node_dir: Path) -> None:
    source = _source(tmp_path, 300)
    address = _address()
    with _node(node_dir, "--bind", address, "--requirepass", "pw", "--enable-debug-command", "local") as conn:
        relay = _Relay({"Password": "pw"})
        assert relay.listening.wait(30)
        for hello in (b"CACHEVAULT-SEED/1 " + b"f" * len(TOKEN) + b"\n", b"PING\r\n"):  # wrong token, not a cutter
            with socket.create_connection((address, seed_relay.RELAY_PORT), timeout=15) as stranger:
                stranger.sendall(hello)
                assert stranger.recv(100) == b""  # closed unanswered
        with _links(address, relay) as links:
            route = rdb_cut.route_slots([[(0, 8191)]])
            [stats] = cutter.stream(links, [lambda: RdbFile(source)], route, 10, time.monotonic() + 60)
        assert relay.done() == stats.bytes_written > 0
        assert conn.dbsize() == stats.keys > 0 and stats.keys + stats.keys_elsewhere == 300
        assert not (node_dir / seed_cluster.LOAD_FILE).exists()


def test_a_node_that_refuses_debug_is_reported_to_the_cutter(tmp_path: Path, node_dir: Path) -> None:
    address = _address()
    with _node(node_dir, "--bind", address, "--requirepass", "pw", "--enable-debug-command", "no") as conn:
        relay = _Relay({"Password": "pw"})
        with pytest.raises(SeedFailed, match="DEBUG RELOAD with -ERR"), _links(address, relay):
            pass
        assert isinstance(relay.done(), SeedFailed)
        assert conn.dbsize() == 0
        assert not (node_dir / seed_cluster.LOAD_FILE).exists()


def test_a_source_that_breaks_midway_never_completes_the_load(tmp_path: Path, node_dir: Path) -> None:
    good = tmp_path / "good.rdb"  # 3 MB: the node was sent chunks before the break
    records = b"".join(b"\x00" + enc_str(b"k%d" % i) + enc_str(b"v" * 1000) for i in range(3000))
    good.write_bytes(rdb_file(10, b"\xfe\x00" + records))

    address = _address()
    with _node(node_dir, "--bind", address, "--requirepass", "pw", "--enable-debug-command", "local") as conn:
        relay = _Relay({"Password": "pw"})

        def broken() -> RdbFile:
            # Once the node was sent two chunks of the first source (bounded: 30 s at most).
            deadline = time.monotonic() + 30
            while relay.relayed < 2 << 20 and time.monotonic() < deadline:
                time.sleep(0.01)
            raise OSError("the range GET failed")

        with _links(address, relay) as links, pytest.raises(OSError, match="range GET failed"):
            cutter.stream(links, [lambda: RdbFile(good), broken], rdb_cut.route_slots([[(0, 16383)]]), 10,
                          time.monotonic() + 60)  # fmt: skip
        # No trailer went out: the seed says the stream broke off, the server's DEBUG RELOAD
        # failed (it keeps what it read: the failed restore stops the node's task), it lives.
        failure = relay.done()
        assert isinstance(failure, SeedFailed) and "broke off after" in str(failure)
        assert int(str(failure).split("after ")[1].split()[0]) >= 2 << 20
        assert conn.ping()
        assert not (node_dir / seed_cluster.LOAD_FILE).exists()


def test_a_node_that_dies_midway_fails_the_cut_with_the_seeds_reason(tmp_path: Path, node_dir: Path) -> None:
    good = tmp_path / "good.rdb"  # 3 MB per source: the node was sent chunks before it died
    records = b"".join(b"\x00" + enc_str(b"k%d" % i) + enc_str(b"v" * 1000) for i in range(3000))
    good.write_bytes(rdb_file(10, b"\xfe\x00" + records))

    address = _address()
    with _node(node_dir, "--bind", address, "--requirepass", "pw", "--enable-debug-command", "local") as conn:
        pid = int(conn.info("server")["process_id"])
        relay = _Relay({"Password": "pw"})

        def after_the_node_died() -> RdbFile:
            # Once the node was sent two chunks (bounded: 30 s at most), it is killed, as an OOM
            # kill or a stopped task would; the cutter then goes on sending the next source.
            deadline = time.monotonic() + 30
            while relay.relayed < 2 << 20 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            return RdbFile(good)

        with _links(address, relay) as links, pytest.raises(SeedFailed) as failed:
            cutter.stream(links, [lambda: RdbFile(good), after_the_node_died], rdb_cut.route_slots([[(0, 16383)]]),
                          10, time.monotonic() + 60)  # fmt: skip
        # The cutter names the node and says what its seed saw, not a bare broken pipe.
        assert "node-1" in str(failed.value)
        failure = relay.done()
        assert isinstance(failure, SeedFailed)
        assert str(failure) in str(failed.value)
        assert not (node_dir / seed_cluster.LOAD_FILE).exists()


def test_a_node_that_waits_long_for_its_slots_is_kept_alive(
    tmp_path: Path, node_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose slots the current source does not hold hears nothing but keepalives: with
    the seed's idle limit shorter than the source takes, the load still completes."""
    monkeypatch.setattr(seed_relay, "IO_TIMEOUT_S", 1.0)
    monkeypatch.setattr(cutter, "KEEPALIVE_S", 0.2)
    source = _source(tmp_path, 300)

    class Slow(RdbFile):
        def iter_raw(self) -> Any:
            deadline = time.monotonic() + 3.0  # three idle limits without a byte for the node
            while time.monotonic() < deadline:  # bounded by the deadline
                time.sleep(0.05)
            yield from super().iter_raw()

    address = _address()
    with _node(node_dir, "--bind", address, "--requirepass", "pw", "--enable-debug-command", "local") as conn:
        relay = _Relay({"Password": "pw"})
        with _links(address, relay) as links:
            [stats] = cutter.stream(links, [lambda: Slow(source)], rdb_cut.route_slots([[(0, 16383)]]), 10,
                                    time.monotonic() + 60)  # fmt: skip
        assert relay.done() == stats.bytes_written and conn.dbsize() == stats.keys == 300


def test_the_relay_needs_a_real_token() -> None:
    assert seed_relay.parse_relay(json.dumps({"Token": TOKEN})) == TOKEN
    for text in ("{}", '{"Token": "short"}', "not json", "[1]"):
        with pytest.raises(SeedFailed):
            seed_relay.parse_relay(text)


def test_a_frame_header_is_a_length_an_end_or_a_keepalive() -> None:
    assert int.from_bytes(seed_relay.END_FRAME, "big") == 0
    assert int.from_bytes(seed_relay.KEEPALIVE_FRAME, "big") > seed_relay.MAX_FRAME


def test_chunks_shrink_with_many_nodes() -> None:
    assert cutter.chunk_bytes(3) == rdb_cut.FLUSH_BYTES
    assert cutter.chunk_bytes(500) == cutter.MIN_CHUNK
    assert cutter.chunk_bytes(30) * 30 * (cutter.QUEUED_CHUNKS + 2) <= cutter.MEMORY_BUDGET

