"""One pass over a reshard's sources, each record streamed to the seed of the node that owns it.

LoadShard runs this for a resharded seeded restore whose nodes' seeds would otherwise each
read the sources several times over (restore.steps ``seed_reads``). Each new primary's seed
relays what it is sent into the FIFO its node loads from (restore.seed_relay); this side
opens one connection per node, writes each node a whole RDB (rdb.cut ``cut_routed``: records
copied, never re-encoded) and closes every RDB with its trailer only after the last source
was checked. One slow node holds the others back only once its queue is full: each link
sends from its own thread, behind a bounded queue.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from cachevault.rdb import cut as rdb_cut
from cachevault.restore.seed import IO_TIMEOUT_S, SeedFailed
from cachevault.restore.seed_relay import HELLO, RELAY_PORT

QUEUED_CHUNKS = 4  # per node, besides the chunk being sent
MEMORY_BUDGET = 64 << 20  # bytes of chunks the cutter holds for all nodes together, about
MIN_CHUNK = 64 << 10


def chunk_bytes(nodes: int) -> int:
    """How much a node's writer gathers before it sends: 1 MiB, less for many nodes."""
    return max(MIN_CHUNK, min(rdb_cut.FLUSH_BYTES, MEMORY_BUDGET // (max(1, nodes) * (QUEUED_CHUNKS + 2))))


class RelayLink:
    """The connection to one node's seed: ``link(data)`` queues bytes, a thread sends them."""

    def __init__(self, name: str, host: str, token: str, *, port: int = RELAY_PORT,
                 timeout_s: float = IO_TIMEOUT_S) -> None:  # fmt: skip
        self.name = name
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.buf = b""
        self.error: BaseException | None = None
        self.aborted = False
        self.queue: queue.Queue[bytes | None] = queue.Queue(QUEUED_CHUNKS)
        self.thread: threading.Thread | None = None
        try:
            self.sock.sendall(HELLO + token.encode() + b"\n")
            self._expect("+READY")
        except BaseException:
            self.sock.close()
            raise

    def start(self) -> None:
        self.thread = threading.Thread(target=self._send, name=f"relay-{self.name}", daemon=True)
        self.thread.start()

    def __call__(self, data: bytes) -> None:
        self._put(data)

    def end(self) -> None:
        """The stream is whole: the sender closes its side once it sent the rest."""
        self._put(None)

    def result(self, timeout_s: float) -> int:
        """The bytes the seed relayed, once its node said it loaded them."""
        assert self.thread is not None
        self.thread.join(IO_TIMEOUT_S * 2)
        if self.error is not None or self.thread.is_alive():
            raise SeedFailed(f"the seed of {self.name}: {self.error or 'the stream did not drain'}")
        return int(self._expect("+OK", timeout_s).split()[1])

    def _put(self, data: bytes | None) -> None:
        while True:  # bounded: the sender takes a chunk or fails within IO_TIMEOUT_S
            if self.error is not None:
                raise SeedFailed(f"the seed of {self.name}: {self.error}") from self.error
            with contextlib.suppress(queue.Full):
                self.queue.put(data, timeout=0.5)
                return

    def abort(self) -> None:
        """The stream ends unfinished (no trailer, no end frame): the node's load fails."""
        self.aborted = True
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _send(self) -> None:
        try:
            while (data := self.queue.get()) is not None:  # bounded: the producer ends with None
                self.sock.sendall(len(data).to_bytes(4, "big"))  # restore.seed_relay's frames
                self.sock.sendall(data)
                if select.select([self.sock], [], [], 0)[0]:  # the seed speaks only to stop it
                    self._expect("+OK")
                    raise SeedFailed("the seed answered before the stream ended")
            if self.aborted:
                return
            self.sock.sendall(bytes(4))  # the frame that says the stream is whole
            self.sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # the producer raises it on its next chunk
            self.error = exc

    def _expect(self, status: str, timeout_s: float = IO_TIMEOUT_S) -> str:
        self.sock.settimeout(timeout_s)
        while b"\r\n" not in self.buf:  # bounded: recv raises on timeout, b"" ends it
            data = self.sock.recv(4096)
            if not data:
                raise SeedFailed("the seed closed the connection")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        text = line.decode(errors="replace")
        if not text.startswith(status):
            raise SeedFailed(text.removeprefix("-ERR ")[:2000])
        return text


def connect(
    nodes: Sequence[tuple[str, str]],
    token: str,
    listening: Callable[[], set[str]],
    deadline: float,
    pauses: Any,
) -> list[RelayLink]:
    """A link to each node's seed (name, host), once ``listening()`` names it; raises what
    ``listening`` raises (a failed seed, a stopped task)."""
    links: dict[str, RelayLink] = {}
    try:
        while len(links) < len(nodes):  # bounded by the deadline
            ready = listening()
            for name, host in nodes:
                if name not in links and name in ready:
                    try:
                        links[name] = RelayLink(name, host, token)
                    except OSError as exc:  # it listened: it took another cutter, or it is gone
                        where = f"{host}:{RELAY_PORT}"
                        raise SeedFailed(f"the seed of {name} at {where} refused the cutter: {exc}") from exc
            if len(links) == len(nodes):
                break
            if time.monotonic() > deadline:
                waiting = [name for name, _ in nodes if name not in links]
                raise SeedFailed(f"the seeds of {', '.join(waiting)} were not listening in time")
            time.sleep(next(pauses))
    except BaseException:
        for link in links.values():
            link.abort()
        raise
    return [links[name] for name, _ in nodes]


def stream(
    links: Sequence[RelayLink],
    openers: Sequence[Callable[[], Any]],
    route: rdb_cut.Route,
    rdb_version: int,
    finish_timeout_s: float,
) -> list[rdb_cut.CutStats]:
    """Cut the sources into the links (``route``: slot -> 1 + link index), end every RDB once all
    sources were checked, and wait for every node's load; each node's counts."""
    try:
        writers = [rdb_cut.RdbWriter(link, rdb_version, chunk_bytes(len(links))) for link in links]
        for link in links:
            link.start()
        stats = rdb_cut.cut_routed(openers, route, writers)
        for writer, part in zip(writers, stats, strict=True):
            part.bytes_written = writer.close()
        for link in links:
            link.end()
        for link in links:
            link.result(finish_timeout_s)
    except BaseException:
        for link in links:
            link.abort()
        raise
    return stats
