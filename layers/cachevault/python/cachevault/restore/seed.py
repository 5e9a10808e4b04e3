"""A new node's data, served from S3 as its first master: the node task's ``seed`` container.

The seeded node task definitions (template.yaml, ``*SeededNodeTaskDefinition``) run
``python -m cachevault.worker seed`` beside the server, not essential. ProvisionCache passes
each node's seed the shard's source in ``SEED_SOURCE`` (bucket, key, version, SHA-256, size)
and the restore's execution name; other nodes (``cache create``, a resharded restore) run the
plain definitions, without a seed.

The seed listens on an ephemeral port of its task and reports it in its progress part
(``Port``); LoadShard then tells the node ``REPLICAOF <its own address> <port>``. To the node
the seed is a master that answers PSYNC with a full resync: ``+FULLRESYNC <replid> 0`` and the
RDB as the payload, read from S3 with ranged GETs and streamed as it arrives. The node
(``repl-diskless-load on-empty-db``) parses it straight from the socket, so the download,
the SHA-256 check and the load overlap and nothing is written to disk. The last bytes go
out only once the whole object's SHA-256 is checked (``storage.S3RangeReader`` raises on
the read that completes it): a wrong object never finishes loading, and a node whose load
fails empties itself. The replication ID comes from the object's digest, so every node of a
shard gets the same ID and offset: once the primary is promoted (REPLICAOF NO ONE, keeping
that ID as its secondary one) its replicas resync partially, with no data sent again.

Only a connection from inside the task is served: from the address it was made to (the
task's own) or from loopback. Anyone else in the VPC who reaches the port gets nothing.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Callable
from typing import Any

from cachevault.core.errors import InvalidParameterValue

SEED_SOURCE_ENV = "SEED_SOURCE"
SEED_TARGET_ENV = "SEED_TARGET"  # the cache (progress is reported under its name)
SEED_NODE_ENV = "SEED_NODE"
SEED_EXECUTION_ENV = "SEED_EXECUTION"  # the restore's execution: its parts are told from an earlier one's
CONNECT_TIMEOUT_S = 900.0  # no node connected by then: the restore that started it is gone
IO_TIMEOUT_S = 120.0  # a send or a wait for the node's acknowledgement without progress
SOURCE_FIELDS = ("Bucket", "Key", "VersionId", "Sha256", "Size")  # what pins a source object


class SeedFailed(Exception):
    """The node could not be served (nobody connected, the connection broke)."""


def progress_part(node: str) -> str:
    """The seed's part in the restore's progress (its port, its bytes sent, why it failed)."""
    return f"seed-{node}"


def seed_environment(source: dict[str, Any] | None, target: str, node: str, execution: str) -> list[dict[str, str]]:
    """The seed container's environment overrides for one node loading ``source`` (a restore
    source; None for a cluster node's seed, whose plan restore.seed_cluster adds)."""
    entries = []
    if source is not None:
        document = {k: source[k] for k in SOURCE_FIELDS if source.get(k) is not None}
        entries.append({"name": SEED_SOURCE_ENV, "value": json.dumps(document, separators=(",", ":"))})
    return [
        *entries,
        {"name": SEED_TARGET_ENV, "value": target},
        {"name": SEED_NODE_ENV, "value": node},
        {"name": SEED_EXECUTION_ENV, "value": execution},
    ]


def parse_source(text: str) -> dict[str, Any]:
    try:
        source = json.loads(text)
    except ValueError as exc:
        raise InvalidParameterValue(f"{SEED_SOURCE_ENV} is not JSON: {exc}") from exc
    if not isinstance(source, dict) or not source.get("Bucket") or not source.get("Key"):
        raise InvalidParameterValue(f"{SEED_SOURCE_ENV} must name a Bucket and a Key, got {text[:200]!r}")
    if not source.get("Sha256") or not source.get("Size"):
        raise InvalidParameterValue(f"{SEED_SOURCE_ENV}: only an object pinned by SHA-256 and size seeds a node")
    return source


def replication_id(source: dict[str, Any]) -> str:
    """The same 40 hex digits for every node seeded from this object."""
    return str(source["Sha256"]).lower()[:40]


def listen() -> socket.socket:
    """A listening socket on an ephemeral port of every address of the task."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("0.0.0.0", 0))  # the task's addresses; accept_node checks who connects
    server.listen(4)
    return server


def _from_inside(conn: socket.socket) -> bool:
    peer, local = conn.getpeername()[0], conn.getsockname()[0]
    return peer == local or ipaddress.ip_address(peer).is_loopback


def accept_node(server: socket.socket, timeout_s: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """The first connection from inside the task (others are closed unanswered)."""
    return accept_first(server, _from_inside, timeout_s, "no node connected")


def accept_first(
    server: socket.socket, admit: Callable[[socket.socket], bool], timeout_s: float, nobody: str
) -> socket.socket:
    """The first connection ``admit`` lets in (the others are closed unanswered), within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:  # bounded by the deadline
        left = deadline - time.monotonic()
        if left <= 0:
            raise SeedFailed(f"{nobody} within {timeout_s:.0f} s")
        server.settimeout(left)
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        try:
            admitted = admit(conn)
        except OSError:  # reset before it was looked at
            admitted = False
        if admitted:
            conn.settimeout(IO_TIMEOUT_S)
            return conn
        conn.close()


def serve(
    conn: socket.socket,
    source: dict[str, Any],
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Answer the node's replication handshake, stream the checked RDB, wait for its ACK; bytes sent."""
    from cachevault.catalog import storage  # boto3: only a node that has something to seed loads it
    from cachevault.core.aws import client

    requests = _Requests(conn)
    psync = _handshake(conn, requests, source)
    s3 = storage.S3RangeReader(
        client("s3"),
        source["Bucket"],
        source["Key"],
        expected_sha256=source["Sha256"],
        size=int(source["Size"]),
        version_id=source.get("VersionId"),
    )
    sent = 0
    with s3:
        conn.sendall(b"$%d\r\n" % s3.size)
        while chunk := s3.read(storage.RANGE_SIZE):  # the read that completes the object checks it first
            conn.sendall(chunk)
            sent += len(chunk)
            if on_bytes is not None:
                on_bytes(sent)
    if psync:  # a SYNC client (no node this product starts) acknowledges nothing
        _await_ack(requests)
    return sent


class _Requests:
    """The node's commands to its master: RESP arrays of bulk strings, between which a loading
    replica sends bare newlines to keep its link alive (hiredis parses replies, not these)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buf = b""

    def __iter__(self) -> Any:
        while True:  # bounded: recv raises on timeout, returns b"" when the node hangs up
            while (command := self._parse()) is not None:
                yield command
            data = self.conn.recv(1 << 16)
            if not data:
                raise SeedFailed("the node closed the connection")
            self.buf += data

    def _parse(self) -> list[bytes] | None:
        buf = self.buf.lstrip(b"\r\n")
        self.buf = buf
        if not buf:
            return None
        if buf[:1] != b"*":  # an inline command: one line of words
            line, sep, rest = buf.partition(b"\n")
            if not sep:
                return None
            self.buf = rest
            return line.strip().split()
        pos, items = 0, []
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        count, pos = int(buf[1:end]), end + 2
        for _ in range(count):
            end = buf.find(b"\r\n", pos)
            if end < 0 or buf[pos : pos + 1] != b"$":
                return None if end < 0 else self._bad(buf)
            size, pos = int(buf[pos + 1 : end]), end + 2
            if len(buf) < pos + size + 2:
                return None
            items.append(buf[pos : pos + size])
            pos += size + 2
        self.buf = buf[pos:]
        return items

    def _bad(self, buf: bytes) -> list[bytes]:
        raise SeedFailed(f"the node sent a request this seed does not understand: {buf[:60]!r}")


def _handshake(conn: socket.socket, requests: _Requests, source: dict[str, Any]) -> bool:
    """PING, AUTH, REPLCONF as a master answers them; returns once the node asked for a sync
    (True: PSYNC, False: the old SYNC)."""
    for command in requests:
        name = command[0].upper() if command else b""
        if name == b"PING":
            conn.sendall(b"+PONG\r\n")
        elif name in (b"AUTH", b"REPLCONF"):
            conn.sendall(b"+OK\r\n")  # its masterauth is the cache's: this master asks for none
        elif name == b"PSYNC":
            conn.sendall(b"+FULLRESYNC %s 0\r\n" % replication_id(source).encode())
            return True
        elif name == b"SYNC":
            return False
        else:
            conn.sendall(b"-ERR this master only serves a full resync\r\n")
    raise SeedFailed("the node closed the connection")  # unreachable: the requests end by raising


def _await_ack(requests: _Requests) -> None:
    """The node acknowledges the stream once it has loaded it (REPLCONF ACK)."""
    for command in requests:
        if len(command) >= 2 and command[0].upper() == b"REPLCONF" and command[1].upper() == b"ACK":
            return
