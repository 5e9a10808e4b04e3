"""A new cluster node's data, cut from the restore's RDBs by its task's seed container.

A cluster node cannot follow a seed as a replica (``REPLICAOF`` is refused in cluster mode),
so a cluster-mode seeded restore (restore.seeded ``seedable``) loads each new primary the way
a server loads at start-up: from an RDB file. The file is a FIFO, so nothing goes to disk:

* the seeded node task definitions (template.yaml) share a task volume between the ``seed``
  container (at ``/seed``) and the server (at ``/data``, its working dir). ProvisionCache
  starts such a node with a unix socket there (``--unixsocket node.sock``), beside its TCP
  port, and passes its seed the plan: the sources whose slots meet the node's, the node's
  slot ranges, the RDB version to write (``SEED_CUT``) and the node's AUTH (``SEED_NODE_AUTH``);
* the seed connects to that socket (a unix socket is the only way in that speaks no TLS and
  counts as local, which ``DEBUG`` needs: ``--enable-debug-command local``), makes a FIFO
  named as the server's ``dbfilename`` and sends ``DEBUG RELOAD NOSAVE``: the server opens the
  FIFO and loads whatever comes through it, as at start-up;
* the seed streams every source from S3 (ranged GETs, SHA-256 checked) through the RDB
  reader and writes the records of the node's slots into the FIFO as a new RDB (rdb.cut):
  download, cut and load overlap. The trailer goes out only after every source's digest and
  CRC64 were checked, so a wrong object never finishes loading; the reply to DEBUG RELOAD
  says whether the server took it all.

The seed keeps its end of the FIFO open until that reply: a server that opens its RDB again
after loading (Redis 7.2+ and Valkey drop its page cache that way) must not wait for a
writer. Then it removes the FIFO, so no later start of the server finds one. LoadShard waits
for every seed, then wires the cluster (restore.seeded ``load_cluster``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from cachevault.core.errors import InvalidParameterValue
from cachevault.nodes.slots import parse_slot_ranges
from cachevault.rdb import cut as rdb_cut
from cachevault.restore.seed import CONNECT_TIMEOUT_S, IO_TIMEOUT_S, SOURCE_FIELDS, SeedFailed

SEED_CUT_ENV = "SEED_CUT"  # {"Sources": [...], "Slots": "0-5460", "RdbVersion": 10}
SEED_AUTH_ENV = "SEED_NODE_AUTH"  # {"Username": ..., "Password": ...}: the node's AUTH
SEED_DIR_ENV = "SEED_DIR"  # the task volume the node works in
SEED_DIR = "/seed"  # where the seed container mounts it (template.yaml)
NODE_SOCKET = "node.sock"  # relative: the node's working dir (a unix socket path has 107 bytes at most)
LOAD_FILE = "dump.rdb"  # the node's dbfilename (the image's default)
PIPE_BYTES = 1 << 20  # the FIFO's buffer (Linux's default limit for an unprivileged process)


def node_arguments() -> list[str]:
    """What a node whose seed loads it needs on its command line."""
    # Only the task's containers see the volume, and the seed's user is the worker image's,
    # not the server's: the socket is open to any user that sees it (AUTH still applies).
    return ["--unixsocket", NODE_SOCKET, "--unixsocketperm", "777"]


def plan_environment(
    sources: list[dict[str, Any]], slots: str, rdb_version: int, username: str | None, password: str | None
) -> list[dict[str, str]]:
    """The seed container's environment entries for one cluster node (besides restore.seed's)."""
    plan = {
        "Sources": [{k: s[k] for k in SOURCE_FIELDS if s.get(k) is not None} for s in sources],
        "Slots": slots,
        "RdbVersion": int(rdb_version),
    }
    auth = {"Username": username, "Password": password} if password else {}
    return [
        {"name": SEED_CUT_ENV, "value": json.dumps(plan, separators=(",", ":"))},
        {"name": SEED_AUTH_ENV, "value": json.dumps(auth, separators=(",", ":"))},
        {"name": SEED_DIR_ENV, "value": SEED_DIR},
    ]


def source_id(source: dict[str, Any]) -> str:
    """One source among a restore's (two may share a key: other buckets, other versions)."""
    version = f"?versionId={source['VersionId']}" if source.get("VersionId") else ""
    return f"s3://{source['Bucket']}/{source['Key']}{version}"


def source_openers(s3: Any, sources: list[dict[str, Any]], on_total: Callable[[int], None]) -> list[Callable[[], Any]]:
    """Opens each source (pinned by SHA-256 and size) as an RdbStream of ranged GETs (the read that
    completes an object checks its digest first); ``on_total``: the bytes read of all of them."""
    from cachevault.catalog import storage  # boto3 and the reader: only a seed that reads S3 loads them
    from cachevault.rdb.reader import RdbStream

    read = [0] * len(sources)

    def opener(i: int, source: dict[str, Any]) -> Callable[[], Any]:
        def count(n: int) -> None:
            read[i] = n
            on_total(sum(read))

        return lambda: RdbStream(storage.S3RangeReader(
            s3, source["Bucket"], source["Key"], expected_sha256=source["Sha256"], size=int(source["Size"]),
            version_id=source.get("VersionId"), on_bytes=count,
        ))  # fmt: skip

    return [opener(i, s) for i, s in enumerate(sources)]


def cut_fields(sources: list[dict[str, Any]], stats: rdb_cut.CutStats) -> dict[str, Any]:
    """What one node was given, as its load reports it (restore.seeded ``check_accounted`` and Verify
    read these): per source its id, its keys in the node's slots and all its keys."""
    by_source = zip(sources, stats.per_source, strict=True)
    return {
        "Keys": stats.keys,
        "KeysWithTtl": stats.keys_with_ttl,
        "KeysExpiredSkipped": stats.keys_expired_skipped,
        "Functions": stats.functions,
        "BytesWritten": stats.bytes_written,
        "SourceKeys": [[source_id(s), mine, every] for s, (mine, every) in by_source],
    }


def parse_plan(text: str) -> dict[str, Any]:
    try:
        plan = json.loads(text)
    except ValueError as exc:
        raise InvalidParameterValue(f"{SEED_CUT_ENV} is not JSON: {exc}") from exc
    sources = plan.get("Sources") if isinstance(plan, dict) else None
    if not sources or not plan.get("Slots") or not plan.get("RdbVersion"):
        raise InvalidParameterValue(f"{SEED_CUT_ENV} must give Sources, Slots and RdbVersion, got {text[:200]!r}")
    for source in sources:
        if not all(source.get(k) for k in ("Bucket", "Key", "Sha256", "Size")):
            raise InvalidParameterValue(f"{SEED_CUT_ENV}: every source is pinned by Bucket, Key, Sha256 and Size")
    return dict(plan)


class Node:
    """The node's unix socket: AUTH, then one command whose reply comes when its load ends."""

    def __init__(self, auth: dict[str, Any], timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:  # bounded by the deadline: the node creates its socket when it starts
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(NODE_SOCKET)
                break
            except PermissionError as exc:  # waiting does not change it
                sock.close()
                raise SeedFailed(f"the node's socket refused this seed: {exc}") from exc
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise SeedFailed(f"the node's socket did not answer within {timeout_s:.0f} s: {exc}") from exc
                time.sleep(0.02)
        sock.settimeout(IO_TIMEOUT_S)
        self.sock = sock
        self.buf = b""
        if auth.get("Password"):
            words = [auth["Username"], auth["Password"]] if auth.get("Username") else [auth["Password"]]
            self.command("AUTH", *words)
            self.expect_ok("AUTH")

    def command(self, *words: str) -> None:
        parts = [b"*%d\r\n" % len(words)]
        for word in words:
            data = word.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(parts))

    def replied(self) -> bool:
        """A reply (or the end of the connection) is waiting to be read."""
        return bool(self.buf) or bool(select.select([self.sock], [], [], 0)[0])

    def _line(self, what: str) -> bytes:
        while b"\r\n" not in self.buf:  # bounded: recv raises on timeout, b"" ends it
            data = self.sock.recv(4096)
            if not data:
                raise SeedFailed(f"the node closed its socket before answering {what}")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def expect_ok(self, what: str) -> None:
        line = self._line(what)
        if line != b"+OK":
            raise SeedFailed(f"the node answered {what} with {line.decode(errors='replace')[:200]}")

    def config(self, name: str) -> str:
        """One setting's value (``CONFIG GET``; none of the settings asked for holds a newline)."""
        what = f"CONFIG GET {name}"
        self.command("CONFIG", "GET", name)
        head = self._line(what)
        if head != b"*2":
            raise SeedFailed(f"the node answered {what} with {head.decode(errors='replace')[:200]}")
        self._line(what), self._line(what)  # $<n>, the name
        self._line(what)  # $<n>
        return self._line(what).decode()

    def close(self) -> None:
        self.sock.close()


def _open_fifo(node: Node, timeout_s: float = IO_TIMEOUT_S) -> int:
    """The FIFO's write end, once the server opened it to read (or why it never will)."""
    deadline = time.monotonic() + timeout_s
    while True:  # bounded by the deadline
        try:
            fd = os.open(LOAD_FILE, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        else:
            os.set_blocking(fd, True)
            with contextlib.suppress(OSError):  # 64 KiB by default: fewer wake-ups on both ends
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            return fd
        if node.replied():
            node.expect_ok("DEBUG RELOAD")  # an answer before any byte was read: an error
            raise SeedFailed("the node answered DEBUG RELOAD before it read the RDB")
        if time.monotonic() > deadline:
            raise SeedFailed(f"the node did not open {LOAD_FILE} within {timeout_s:.0f} s")
        time.sleep(0.005)


def load(plan: dict[str, Any], auth: dict[str, Any], openers: list[Callable[[], Any]]) -> rdb_cut.CutStats:
    """Fill the node (run in its working dir) with the records of its slots from ``openers``
    (one RdbStream each, in ``plan['Sources']`` order); the counts of what it was given."""
    owned = rdb_cut.owned_slots(parse_slot_ranges(plan["Slots"]))
    node = Node(auth)
    try:
        with loading(node) as fifo:
            # Unbuffered (the writer sends ~1 MiB at a time): nothing left to flush at close,
            # where a broken pipe would hide the server's reply.
            writer = rdb_cut.RdbWriter(lambda data: _write_all(fifo, data), int(plan["RdbVersion"]))
            stats = rdb_cut.cut(openers, owned, writer)
            stats.bytes_written = writer.close()
    finally:
        node.close()
    return stats


@contextlib.contextmanager
def loading(node: Node) -> Iterator[int]:
    """The node loading an RDB from its FIFO (run in its working dir): yields the FIFO's write
    end; on leaving, the server's reply (SeedFailed with its reason, if it refused)."""
    fd = -1
    os.mkfifo(LOAD_FILE, 0o644)
    try:
        node.command("DEBUG", "RELOAD", "NOSAVE")
        fd = _open_fifo(node)
        try:
            yield fd
        except BrokenPipeError as exc:  # the server stopped reading: its reply says why
            raise SeedFailed(f"the node stopped reading its RDB: {_reply_or(node, exc)}") from exc
        else:
            node.expect_ok("DEBUG RELOAD")  # the FIFO is still open: see the module's docstring
        finally:
            os.close(fd)
    finally:
        if fd < 0:
            _release_reader()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(LOAD_FILE)


def _write_all(fd: int, data: bytes) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):  # bounded: each write moves at least one byte or raises
            done += os.write(fd, view[done:])


def _release_reader() -> None:
    """A server that opened the FIFO after the seed gave up waits for a writer: one that comes and
    goes at once ends its load with a short read (an error reply, never a loaded node)."""
    with contextlib.suppress(OSError):  # ENXIO: nobody is waiting
        os.close(os.open(LOAD_FILE, os.O_WRONLY | os.O_NONBLOCK))


def _reply_or(node: Node, exc: BaseException) -> str:
    try:
        node.sock.settimeout(5.0)
        node.expect_ok("DEBUG RELOAD")
    except (SeedFailed, OSError) as why:
        return str(why)
    return str(exc)
