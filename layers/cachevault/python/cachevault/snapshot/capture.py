"""RDB capture over the replication protocol.

We connect to a node (normally a replica) as if we were one of its replicas and ask
for a full resync with ``REPLCONF rdb-only 1``: the node forks, streams a point-in-time
RDB to us and then closes the link. Nothing is written to the node's disk (when it runs
``repl-diskless-sync yes``) and the primary does not fork at all.

The payload is streamed chunk by chunk to a sink (an S3 multipart writer, a file ...):
SHA-256, size and the RDB's own CRC64 are computed on the fly, so an RDB of many GB is
never held in memory.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import anycrc

from cachevault.core.errors import CaptureFailed
from cachevault.nodes.credentials import Credentials, TlsError, merge

EOF_MARK_LEN = 40  # diskless transfers end with a 40-byte random marker announced up front
RDB_MAGIC = b"REDIS"
RDB_HEADER_LEN = 9  # "REDIS" + 4 ASCII digits
CRC_LEN = 8
PROGRESS_INTERVAL_S = 0.5
MAX_LINE = 64 * 1024  # a protocol line longer than this is not a reply we understand

_CRC64 = anycrc.Model("CRC64-REDIS")


class _Writer(Protocol):
    def write(self, data: memoryview | bytes, /) -> Any: ...


Sink = Callable[[memoryview | bytes], Any] | _Writer


@dataclass(frozen=True)
class CaptureProgress:
    bytes: int
    elapsed: float
    rate_bps: float


@dataclass
class CaptureResult:
    node: str
    size: int
    sha256: str
    rdb_version: int
    crc64: int  # the RDB's own trailer (little endian); 0 = the node has rdbchecksum off
    crc64_verified: bool
    duration_s: float
    mode: str  # "diskless" ($EOF:<mark>) or "disk" ($<len>)
    replid: str | None = None
    repl_offset: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pack(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Conn:
    """A socket with a small read-ahead buffer for protocol lines.

    Bytes that arrive behind the ``$...`` header belong to the payload; ``take_buffered``
    hands them over so the streaming loop can start with them.
    """

    def __init__(self, sock: socket.socket, node: str) -> None:
        self.sock = sock
        self.node = node
        self.buf = bytearray()

    def send(self, *args: str | bytes) -> None:
        try:
            self.sock.sendall(_pack(*args))
        except OSError as exc:
            raise CaptureFailed(f"{self.node}: send failed: {exc}", node=self.node) from exc

    def readline(self) -> bytes:
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                return line.rstrip(b"\r")
            if len(self.buf) > MAX_LINE:
                raise CaptureFailed(f"{self.node}: protocol line too long", node=self.node)
            try:
                data = self.sock.recv(65536)
            except TimeoutError as exc:
                raise CaptureFailed(f"{self.node}: timed out waiting for a reply", node=self.node) from exc
            except OSError as exc:
                raise CaptureFailed(f"{self.node}: connection error: {exc}", node=self.node) from exc
            if not data:
                raise CaptureFailed(f"{self.node}: connection closed by the node", node=self.node)
            self.buf += data

    def reply(self) -> bytes:
        """Next non-keepalive line (the node sends bare ``\\n`` while it prepares the RDB)."""
        for _ in range(1_000_000):  # bounded: ~11 days of 1/s keepalives
            line = self.readline()
            if line:
                return line
        raise CaptureFailed(f"{self.node}: no reply, only keepalives", node=self.node)

    def command(self, *args: str | bytes) -> bytes:
        self.send(*args)
        return self.reply()

    def take_buffered(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        return data


def _fail_on_error(line: bytes, node: str, what: str) -> None:
    if line.startswith(b"-"):
        msg = line[1:].decode(errors="replace")
        raise CaptureFailed(f"{node}: {what} refused: {msg}", node=node, error=msg)


class _PayloadChecker:
    """Hash, size, RDB header and CRC64 trailer, all computed on the fly.

    The last 8 bytes seen so far are held out of the CRC because they may be the trailer.
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self.sha = hashlib.sha256()
        self.size = 0
        self.crc = 0
        self.tail = b""
        self.header = b""
        self.rdb_version: int | None = None

    def feed(self, view: memoryview) -> None:
        n = len(view)
        if not n:
            return
        if self.rdb_version is None:
            self.header += bytes(view[: RDB_HEADER_LEN - len(self.header)])
            if len(self.header) == RDB_HEADER_LEN:
                self._check_header()
        self.sha.update(view)
        self.size += n
        if n >= CRC_LEN:
            if self.tail:
                self.crc = _CRC64.calc(self.tail, self.crc)
            self.crc = _CRC64.calc(view[:-CRC_LEN], self.crc)
            self.tail = bytes(view[-CRC_LEN:])
        else:
            both = self.tail + bytes(view)
            if len(both) > CRC_LEN:
                self.crc = _CRC64.calc(both[:-CRC_LEN], self.crc)
                both = both[-CRC_LEN:]
            self.tail = both

    def _check_header(self) -> None:
        h = self.header
        if not (h.startswith(RDB_MAGIC) and h[5:].isdigit()):
            raise CaptureFailed(f"{self.node}: payload is not an RDB (starts with {h!r})", node=self.node)
        self.rdb_version = int(h[5:])

    def finish(self) -> tuple[int, int, bool]:
        """Return (rdb_version, trailer, verified) or raise if the RDB is inconsistent."""
        if self.rdb_version is None or self.size < RDB_HEADER_LEN + CRC_LEN:
            raise CaptureFailed(f"{self.node}: RDB too short ({self.size} bytes)", node=self.node)
        trailer = int.from_bytes(self.tail, "little")
        if trailer == 0:  # rdbchecksum no: the node writes zeros, nothing to verify
            return self.rdb_version, 0, False
        if trailer != self.crc:
            raise CaptureFailed(
                f"{self.node}: RDB CRC64 mismatch: trailer {trailer:016x}, computed {self.crc:016x}",
                node=self.node,
                size=self.size,
            )
        return self.rdb_version, trailer, True


def _resolve_sink(sink: Sink) -> Callable[[memoryview], Any]:
    write = getattr(sink, "write", None)
    if callable(write):
        return write
    if callable(sink):
        return sink
    raise TypeError("sink must be callable or have a .write() method")


def capture_rdb(
    host: str,
    port: int,
    sink: Sink,
    *,
    username: str | None = None,
    password: str | None = None,
    connect_timeout: float = 5,
    read_timeout: float = 60,
    chunk_size: int = 1 << 20,
    progress: Callable[[CaptureProgress], None] | None = None,
    rdb_only: bool = True,
    use_psync: bool = True,
    credentials: Credentials | None = None,
) -> CaptureResult:
    """Stream a point-in-time RDB of ``host:port`` into ``sink``.

    The sink receives memoryviews over a reused buffer: it must consume (write/copy) the
    bytes before returning. Errors from the node or the link raise ``CaptureFailed``;
    errors raised by the sink propagate unchanged.
    """
    node = f"{host}:{port}"
    write = _resolve_sink(sink)
    notes: list[str] = []
    started = time.monotonic()
    creds = merge(credentials, username, password)
    try:
        # TLS when the cache has transit encryption: the stream is then read through the
        # SSL layer (recv_into works the same on an SSLSocket).
        sock = creds.connect(host, port, connect_timeout)
    except TlsError as exc:
        raise CaptureFailed(f"{node}: {exc}", node=node) from exc
    except OSError as exc:
        raise CaptureFailed(f"{node}: cannot connect: {exc}", node=node) from exc
    try:
        conn = _Conn(sock, node)
        if creds.auth_args is not None:
            _fail_on_error(conn.command(*creds.auth_args), node, "AUTH")
        if rdb_only:
            line = conn.command("REPLCONF", "rdb-only", "1")
            if line.startswith(b"-"):
                # Redis < 7.0 does not know rdb-only: the capture still works but the link
                # stays open as a real replica (we close it) and may hit output-buffer limits.
                notes.append(f"rdb-only not supported: {line[1:].decode(errors='replace')}")
        capa = ("REPLCONF", "capa", "eof", "capa", "psync2") if use_psync else ("REPLCONF", "capa", "eof")
        _fail_on_error(conn.command(*capa), node, "REPLCONF capa")

        # The node may take a while to start its fork; it sends keepalives meanwhile.
        sock.settimeout(read_timeout)
        replid: str | None = None
        offset: int | None = None
        if use_psync:
            line = conn.command("PSYNC", "?", "-1")
            _fail_on_error(line, node, "PSYNC")
            parts = line.split()
            if parts[0] != b"+FULLRESYNC" or len(parts) != 3:
                raise CaptureFailed(f"{node}: unexpected PSYNC reply {line[:100]!r}", node=node)
            replid, offset = parts[1].decode(), int(parts[2])
            header = conn.reply()
        else:
            header = conn.command("SYNC")
        _fail_on_error(header, node, "SYNC")
        if not header.startswith(b"$"):
            raise CaptureFailed(f"{node}: unexpected SYNC reply {header[:100]!r}", node=node)

        checker = _PayloadChecker(node)
        reporter = _Progress(progress, started)
        if header.startswith(b"$EOF:"):
            mode = "diskless"
            mark = header[5:]
            if len(mark) != EOF_MARK_LEN:
                raise CaptureFailed(f"{node}: bad EOF marker length {len(mark)}", node=node)
            _stream_until_mark(conn, mark, chunk_size, checker, write, reporter)
        else:
            mode = "disk"
            try:
                length = int(header[1:])
            except ValueError as exc:
                raise CaptureFailed(f"{node}: bad bulk header {header[:100]!r}", node=node) from exc
            _stream_length(conn, length, chunk_size, checker, write, reporter)
        rdb_version, trailer, verified = checker.finish()
        reporter.final(checker.size)
    finally:
        sock.close()
    return CaptureResult(
        node=node,
        size=checker.size,
        sha256=checker.sha.hexdigest(),
        rdb_version=rdb_version,
        crc64=trailer,
        crc64_verified=verified,
        duration_s=time.monotonic() - started,
        mode=mode,
        replid=replid,
        repl_offset=offset,
        notes=notes,
    )


class _Progress:
    def __init__(self, callback: Callable[[CaptureProgress], None] | None, started: float) -> None:
        self.callback = callback
        self.started = started
        self.next_at = time.monotonic() + PROGRESS_INTERVAL_S

    def _emit(self, nbytes: int, now: float) -> None:
        assert self.callback is not None
        elapsed = now - self.started
        self.callback(CaptureProgress(nbytes, elapsed, nbytes / elapsed if elapsed > 0 else 0.0))

    def tick(self, nbytes: int) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if now >= self.next_at:
            self.next_at = now + PROGRESS_INTERVAL_S
            self._emit(nbytes, now)

    def final(self, nbytes: int) -> None:
        if self.callback is not None:
            self._emit(nbytes, time.monotonic())


def _recv_into(conn: _Conn, view: memoryview, received: int) -> int:
    try:
        n = conn.sock.recv_into(view)
    except TimeoutError as exc:
        raise CaptureFailed(
            f"{conn.node}: stream stalled after {received} bytes", node=conn.node, received=received
        ) from exc
    except OSError as exc:
        raise CaptureFailed(
            f"{conn.node}: connection lost after {received} bytes: {exc}", node=conn.node, received=received
        ) from exc
    if n == 0:
        raise CaptureFailed(
            f"{conn.node}: connection closed mid-stream after {received} bytes",
            node=conn.node,
            received=received,
        )
    return n


def _emit(view: memoryview, checker: _PayloadChecker, write: Callable[[memoryview], Any]) -> None:
    if len(view):
        checker.feed(view)
        write(view)


def _stream_until_mark(
    conn: _Conn,
    mark: bytes,
    chunk_size: int,
    checker: _PayloadChecker,
    write: Callable[[memoryview], Any],
    reporter: _Progress,
) -> None:
    # buf[:held] always holds the (up to 40) newest bytes, not yet emitted because they
    # could be the end marker; each recv lands right behind them, so nothing is copied
    # except those 40 bytes.
    buf = bytearray(chunk_size + EOF_MARK_LEN)
    view = memoryview(buf)
    early = conn.take_buffered()
    held = 0
    received = 0
    pending = memoryview(early)
    for _ in range(1 << 40):  # bounded by the byte count; each pass consumes >= 1 byte
        if pending:
            n = min(len(pending), chunk_size)
            buf[held : held + n] = pending[:n]
            pending = pending[n:]
        else:
            n = _recv_into(conn, view[held : held + chunk_size], received)
        received += n
        total = held + n
        if total >= EOF_MARK_LEN and buf[total - EOF_MARK_LEN : total] == mark and not pending:
            _emit(view[: total - EOF_MARK_LEN], checker, write)
            return
        keep = min(total, EOF_MARK_LEN)
        _emit(view[: total - keep], checker, write)
        buf[:keep] = buf[total - keep : total]
        held = keep
        reporter.tick(checker.size)
    raise CaptureFailed(f"{conn.node}: stream never ended", node=conn.node)


def _stream_length(
    conn: _Conn,
    length: int,
    chunk_size: int,
    checker: _PayloadChecker,
    write: Callable[[memoryview], Any],
    reporter: _Progress,
) -> None:
    early = conn.take_buffered()[:length]
    _emit(memoryview(early), checker, write)
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    remaining = length - len(early)
    for _ in range(1 << 40):
        if remaining <= 0:
            return
        n = _recv_into(conn, view[: min(chunk_size, remaining)], length - remaining)
        _emit(view[:n], checker, write)
        remaining -= n
        reporter.tick(checker.size)
    raise CaptureFailed(f"{conn.node}: stream never ended", node=conn.node)
