"""A new cluster node's data, streamed to its task's seed by the restore's cutter.

A reshard that would make every node's seed read the sources several times over (1 -> 3
shards reads the one RDB three times, restore.seeded ``seed_reads``) is cut once instead: one
cutter, LoadShard (restore.cutter), reads each source once and routes every record to the
node that owns its slot. The node still loads as at start-up, from an RDB its seed feeds
into a FIFO (restore.seed_cluster ``loading``); here the seed only relays the cutter's bytes:

* it listens on RELAY_PORT where its node listens (the node's ``bind``: every address of the
  task on ECS; the task's own address where tasks share a host), and says so in its progress
  part (``Port``);
* the first connection that sends ``HELLO`` and the restore's token (ProvisionCache gave it
  to the seeds in ``SEED_RELAY`` and to LoadShard in S3) is the cutter; any other connection
  is closed unanswered. Only then does the node start loading (``DEBUG RELOAD NOSAVE``), and
  the seed answers ``+READY``;
* it copies what the cutter sends (frames: 4 bytes of length, big-endian, then the bytes;
  ``KEEPALIVE_FRAME`` every few seconds while it has nothing for this node) into the FIFO
  until a frame of 0 bytes ends the stream, then answers ``+OK <bytes>`` once
  the server replied that it loaded them, or ``-ERR <why>``. A stream that ends without
  that frame (the cutter failed or died) closes the FIFO at once: the server's load fails.

The cutter writes the RDB whole, header to CRC64 trailer, and the trailer only after every
source's SHA-256 and CRC64 were checked: a stream that breaks off, or a source that is not the
snapshot, never finishes loading. The server checks the trailer it reads.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from cachevault.restore.seed import CONNECT_TIMEOUT_S, IO_TIMEOUT_S, SeedFailed, accept_first
from cachevault.restore.seed_cluster import SEED_AUTH_ENV, SEED_DIR, SEED_DIR_ENV, Node, loading

SEED_RELAY_ENV = "SEED_RELAY"  # {"Token": "<hex>"}
RELAY_PORT = 6380  # template.yaml: the seed container's port; the tasks' security group opens it
HELLO = b"CACHEVAULT-SEED/1 "  # then the token and a newline
HELLO_WAIT_S = 2.0  # a connection that has not said who it is by then is closed (one at a time)
MAX_FRAME = 1 << 30  # bytes in one frame (its length is 4 bytes); a bigger record takes several
END_FRAME = bytes(4)  # a frame of 0 bytes: the stream is whole
KEEPALIVE_FRAME = b"\xff" * 4  # no bytes, only a sign of life (past MAX_FRAME: never a length)
RELAY_CHUNK = 1 << 20
_DRAIN_S = 30.0  # after an error: how long the seed reads on, so the cutter sees the reason


def relay_environment(token: str, username: str | None, password: str | None) -> list[dict[str, str]]:
    """The seed container's environment entries for one node the cutter loads (besides restore.seed's)."""
    auth = {"Username": username, "Password": password} if password else {}
    return [
        {"name": SEED_RELAY_ENV, "value": json.dumps({"Token": token}, separators=(",", ":"))},
        {"name": SEED_AUTH_ENV, "value": json.dumps(auth, separators=(",", ":"))},
        {"name": SEED_DIR_ENV, "value": SEED_DIR},
    ]


def parse_relay(text: str) -> str:
    """The token in ``SEED_RELAY``."""
    try:
        token = json.loads(text).get("Token")
    except (ValueError, AttributeError) as exc:
        raise SeedFailed(f"{SEED_RELAY_ENV} is not a JSON object: {exc}") from exc
    if not isinstance(token, str) or len(token) < 32:
        raise SeedFailed(f"{SEED_RELAY_ENV} must give a Token of 32 characters or more")
    return token


def listen_address(node: Node) -> str:
    """Where the node listens: the first address of its ``bind`` (``*`` and ``::*`` mean all)."""
    for word in node.config("bind").split():
        address = word.lstrip("-")
        if address not in ("*", "::*"):
            return address
    return "0.0.0.0"


def relay(
    token: str,
    auth: dict[str, Any],
    *,
    on_listening: Callable[[int], None],
    on_bytes: Callable[[int], None],
    timeout_s: float = CONNECT_TIMEOUT_S,
) -> int:
    """Wait for the cutter, load the node with what it sends (run in the node's working dir);
    the bytes relayed."""
    node = Node(auth)
    try:
        address = listen_address(node)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.create_server((address, RELAY_PORT), family=family, backlog=8) as server:
            on_listening(RELAY_PORT)
            conn = accept_cutter(server, token, timeout_s)
        conn.settimeout(IO_TIMEOUT_S)  # the longest wait between frames (the cutter sends keepalives)
        with conn:
            try:
                relayed = _relay(node, conn, on_bytes)
            except Exception as exc:
                _tell(conn, f"-ERR {exc}".replace("\r", " ").replace("\n", " ")[:2000])
                raise
            _tell(conn, f"+OK {relayed}")
            return relayed
    finally:
        node.close()


def accept_cutter(server: socket.socket, token: str, timeout_s: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """The first connection that gives the restore's token; the others are closed unanswered."""
    expected = HELLO + token.encode() + b"\n"
    return accept_first(server, lambda conn: hmac.compare_digest(_hello(conn, len(expected)), expected),
                        timeout_s, "the cutter did not connect")  # fmt: skip


def _hello(conn: socket.socket, size: int) -> bytes:
    """The first line a connection sends (at most ``size`` bytes, within HELLO_WAIT_S in all)."""
    deadline = time.monotonic() + HELLO_WAIT_S
    data = b""
    with contextlib.suppress(OSError):
        while len(data) < size and not data.endswith(b"\n"):  # bounded: size bytes, or the deadline
            left = deadline - time.monotonic()
            if left <= 0:
                break
            conn.settimeout(left)
            chunk = conn.recv(size - len(data))
            if not chunk:
                break
            data += chunk
    return data


def _relay(node: Node, conn: socket.socket, on_bytes: Callable[[int], None]) -> int:
    relayed = 0
    with loading(node) as fifo:
        _tell(conn, "+READY")
        while True:  # bounded: reads give up after IO_TIMEOUT_S; the cutter's end is a frame of 0 bytes
            head = _exactly(conn, 4, relayed)
            if head == END_FRAME:
                break
            if head == KEEPALIVE_FRAME:
                continue
            size = int.from_bytes(head, "big")
            if size > MAX_FRAME:
                raise SeedFailed(f"the cutter sent a frame of {size} bytes (at most {MAX_FRAME})")
            _splice(conn, fifo, size, relayed)
            relayed += size
            on_bytes(relayed)
    return relayed


def _exactly(conn: socket.socket, size: int, relayed: int) -> bytes:
    data = b""
    while len(data) < size:  # bounded: recv raises on timeout, b"" ends it
        chunk = conn.recv(size - len(data))
        if not chunk:
            # The FIFO closes as this leaves: the server's load ends with a short read.
            raise SeedFailed(f"the cutter's stream broke off after {relayed} bytes")
        data += chunk
    return data


def _splice(conn: socket.socket, fifo: int, size: int, relayed: int) -> None:
    """``size`` bytes from the cutter's socket into the FIFO, in the kernel (no copy through
    Python: relaying 1 GB to three nodes took 3.4 s of the seeds' CPU through recv and write)."""
    left = size
    while left:  # bounded: each round moves bytes, or waits at most IO_TIMEOUT_S for them
        try:
            moved = os.splice(conn.fileno(), fifo, left)
        except BlockingIOError:  # the socket has a timeout, so it does not block: wait here
            if not select.select([conn], [], [], IO_TIMEOUT_S)[0]:
                raise SeedFailed(f"the cutter sent nothing for {IO_TIMEOUT_S:.0f} s") from None
            continue
        if not moved:
            raise SeedFailed(f"the cutter's stream broke off after {relayed + size - left} bytes")
        left -= moved


def _tell(conn: socket.socket, line: str) -> None:
    """One status line to the cutter; after an error, read on until it hangs up (bounded), so
    it reads the reason instead of a reset."""
    with contextlib.suppress(OSError):
        conn.sendall(line.encode() + b"\r\n")
        if line.startswith("-"):
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _DRAIN_S
            while (left := deadline - time.monotonic()) > 0:  # bounded by the deadline
                if select.select([conn], [], [], left)[0] and not conn.recv(RELAY_CHUNK):
                    break
