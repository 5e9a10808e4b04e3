"""Test helpers: real redis-server processes, and hand-built RDB files.

The hand-built files cover what the installed Redis 7.0 never writes (v12 hash
field TTL types, module values, seconds expiry, old-style types, slot info); they
are encoded from the format spec (redis src/rdb.h / rdb.c), with a real CRC64.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from cachevault.rdb.dump_payload import crc64

REDIS_SERVER = "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server on 127.0.0.1 with its data in ``workdir``; stopped by PID."""

    def __init__(self, workdir: Path, *extra: str, binary: str = REDIS_SERVER) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.dir = workdir
        self.port = free_port()
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(workdir), "--enable-debug-command", "yes",
                "--daemonize", "no", "--logfile", str(workdir / "server.log"), *extra]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=60)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)

    def db(self, n: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=n, socket_timeout=60)

    def save(self) -> Path:
        self.client.save()
        return self.dir / "dump.rdb"

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def redis_server(workdir: Path, *extra: str, binary: str = REDIS_SERVER) -> Iterator[RedisServer]:
    server = RedisServer(workdir, *extra, binary=binary)
    try:
        yield server
    finally:
        server.stop()


# -- hand-built RDB encoding ------------------------------------------------------------------
def enc_len(n: int) -> bytes:
    if n < 1 << 6:
        return bytes((n,))
    if n < 1 << 14:
        return bytes((0x40 | (n >> 8), n & 0xFF))
    if n < 1 << 32:
        return b"\x80" + n.to_bytes(4, "big")
    return b"\x81" + n.to_bytes(8, "big")


def enc_str(s: bytes) -> bytes:
    return enc_len(len(s)) + s


def enc_int_str(v: int) -> bytes:
    """Integer-encoded string (RDB_ENC_INT8/16/32)."""
    for enc, width in ((0, 1), (1, 2), (2, 4)):
        if -(1 << (8 * width - 1)) <= v < 1 << (8 * width - 1):
            return bytes((0xC0 | enc,)) + v.to_bytes(width, "little", signed=True)
    raise ValueError(v)


def enc_lzf_literal(s: bytes) -> bytes:
    """A valid LZF string made of literal runs only (exercises the decoder's framing)."""
    body = bytearray()
    for i in range(0, len(s), 32):
        chunk = s[i : i + 32]
        body.append(len(chunk) - 1)
        body += chunk
    return b"\xc3" + enc_len(len(body)) + enc_len(len(s)) + bytes(body)


def ms_time(ms: int) -> bytes:
    return struct.pack("<q", ms)


def rdb_file(version: int, body: bytes, checksum: bool = True) -> bytes:
    data = b"REDIS%04d" % version + body + b"\xff"
    crc = crc64(data) if checksum else 0
    return data + crc.to_bytes(8, "little")
