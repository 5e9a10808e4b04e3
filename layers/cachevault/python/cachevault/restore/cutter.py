"""One pass over a reshard's sources, each record streamed to the seed of the node that owns it.

LoadShard runs this for a resharded seeded restore whose nodes' seeds would otherwise each
read the sources several times over (restore.seeded ``seed_reads``). Each new primary's seed
relays what it is sent into the FIFO its node loads from (restore.seed_relay); this side
opens one connection per node, writes each node a whole RDB (rdb.cut ``cut_routed``: records
copied, never re-encoded) and closes every RDB with its trailer only after the last source
was checked. One slow node holds the others back only once its queue is full: each link
sends from its own thread, behind a bounded queue.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from cachevault.rdb import cut as rdb_cut
from cachevault.restore.seed import IO_TIMEOUT_S, SeedFailed
from cachevault.restore.seed_relay import END_FRAME, HELLO, KEEPALIVE_FRAME, MAX_FRAME, RELAY_PORT

QUEUED_CHUNKS = 4  # per node, besides the chunk being sent
MEMORY_BUDGET = 64 << 20  # bytes of chunks the cutter holds for all nodes together (to ~170 nodes)
MIN_CHUNK = 64 << 10
CONNECT_TIMEOUT_S = 10.0  # a seed that listens answers at once; past this, the network says no
KEEPALIVE_S = 5.0  # a node whose slots the current source does not hold still hears this often
_CLOSED = "the seed closed the connection"


def chunk_bytes(nodes: int) -> int:
    """How much a node's writer gathers before it sends: 1 MiB, less for many nodes."""
    return max(MIN_CHUNK, min(rdb_cut.FLUSH_BYTES, MEMORY_BUDGET // (max(1, nodes) * (QUEUED_CHUNKS + 2))))


class RelayLink:
    """The connection to one node's seed: ``link(data)`` queues bytes, a thread sends them.

    At most ``QUEUED_CHUNKS`` chunks' bytes wait per node, or one record bigger than that
    (rdb.cut sends such a record alone): a slow node holds the cutter back instead of its memory.
    """

    def __init__(self, name: str, host: str, token: str, *, port: int = RELAY_PORT, chunk: int = MIN_CHUNK) -> None:
        self.name = name
        where = f"{host}:{port}"
        try:
            self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:  # it said it listens: the network (a security group) is in the way
            raise SeedFailed(f"the seed of {name} at {where} cannot be reached ({exc}): the node tasks' security "
                             "group must let LoadShard in on TCP 6380 (template TaskSecurityGroups)") from exc
        self.buf = b""
        self.error: BaseException | None = None
        self.aborted = False
        self.budget = chunk * QUEUED_CHUNKS
        self.queued = 0  # bytes waiting in ``pending``
        self.pending: list[bytes | None] = []
        self.ready = threading.Condition()
        self.thread: threading.Thread | None = None
        try:
            self.sock.settimeout(IO_TIMEOUT_S)
            self.sock.sendall(HELLO + token.encode() + b"\n")
            self._expect("+READY")
        except (SeedFailed, OSError) as exc:  # which node's seed, whatever it said
            self.sock.close()
            raise SeedFailed(f"the seed of {name} at {where}: {exc}") from exc
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
        try:
            return int(self._expect("+OK", max(1.0, timeout_s)).split()[1])
        except SeedFailed as exc:  # its -ERR: the whole stream was sent before the node failed
            raise SeedFailed(f"the seed of {self.name}: {exc}") from exc
        except OSError as exc:  # a timeout, a reset: the seed's progress part may say more
            raise SeedFailed(f"the seed of {self.name} did not say its node loaded: {exc}") from exc

    def close(self) -> None:
        self.sock.close()

    def _put(self, data: bytes | None) -> None:
        size = 0 if data is None else len(data)
        with self.ready:
            while True:  # bounded: the sender takes bytes or fails within IO_TIMEOUT_S
                if self.error is not None:
                    raise SeedFailed(f"the seed of {self.name}: {self.error}") from self.error
                if not self.pending or self.queued + size <= self.budget:
                    self.pending.append(data)
                    self.queued += size
                    self.ready.notify_all()
                    return
                self.ready.wait(0.5)

    def _take(self) -> tuple[bool, bytes | None]:
        """(True, the next chunk or None for the end), or (False, None) after KEEPALIVE_S of nothing."""
        with self.ready:
            if not self.pending and not self.aborted:
                self.ready.wait(KEEPALIVE_S)
            if not self.pending:
                return self.aborted, None
            data = self.pending.pop(0)
            self.queued -= 0 if data is None else len(data)
            self.ready.notify_all()
            return True, data

    def abort(self) -> None:
        """The stream ends unfinished (no trailer, no end frame): the node's load fails."""
        with self.ready:
            self.aborted = True
            self.ready.notify_all()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _send(self) -> None:
        try:
            while True:  # bounded: the producer ends with None (or aborts)
                taken, data = self._take()
                if self.aborted:
                    return
                if not taken:
                    self.sock.sendall(KEEPALIVE_FRAME)  # the seed's idle timeout is IO_TIMEOUT_S
                elif data is None:
                    break
                else:
                    with memoryview(data) as view:
                        for at in range(0, len(view), MAX_FRAME):  # a record may pass 4 GiB
                            frame = view[at : at + MAX_FRAME]
                            self.sock.sendall(len(frame).to_bytes(4, "big"))
                            self.sock.sendall(frame)
                if select.select([self.sock], [], [], 0)[0]:  # the seed speaks only to stop it
                    self._expect("+OK")
                    raise SeedFailed("the seed answered before the stream ended")
            self.sock.sendall(END_FRAME)
            self.sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # the producer raises it on its next chunk
            if isinstance(exc, OSError):  # the seed may have said why before it hung up
                exc = self._reason_for(exc)
            self.error = exc
            with self.ready:
                self.ready.notify_all()

    def _reason_for(self, exc: OSError) -> BaseException:
        """The seed's ``-ERR`` line, when it sent one before the connection broke; else ``exc``."""
        try:
            self._expect("+OK", 1.0)
        except SeedFailed as said:
            return exc if str(said) == _CLOSED else said
        except OSError:
            return exc
        return SeedFailed(f"the seed answered before the stream ended, then hung up: {exc}")

    def _expect(self, status: str, timeout_s: float = IO_TIMEOUT_S) -> str:
        self.sock.settimeout(timeout_s)
        while b"\r\n" not in self.buf:  # bounded: recv raises on timeout, b"" ends it
            data = self.sock.recv(4096)
            if not data:
                raise SeedFailed(_CLOSED)
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
                    links[name] = RelayLink(name, host, token, chunk=chunk_bytes(len(nodes)))
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
    deadline: float,
    *,
    sampling: rdb_cut.Sampling | None = None,
) -> list[rdb_cut.CutStats]:
    """Cut the sources into the links (``route``: slot -> 1 + link index), end every RDB once all
    sources were checked, and wait until ``deadline`` (monotonic) for every node's load; each
    node's counts. ``sampling``: rdb.cut ``cut_routed``'s."""
    try:
        writers = [rdb_cut.RdbWriter(link, rdb_version, chunk_bytes(len(links))) for link in links]
        for link in links:
            link.start()
        stats = rdb_cut.cut_routed(openers, route, writers, sampling=sampling)
        for writer, part in zip(writers, stats, strict=True):
            part.bytes_written = writer.close()
        for link in links:
            link.end()
        for link, part in zip(links, stats, strict=True):
            relayed = link.result(deadline - time.monotonic())
            if relayed != part.bytes_written:
                raise SeedFailed(f"the seed of {link.name} relayed {relayed} bytes of {part.bytes_written}")
    except BaseException:
        for link in links:
            link.abort()
        raise
    for link in links:
        link.close()
    return stats
