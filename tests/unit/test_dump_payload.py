"""DUMP/RESTORE payload packing against a real redis-server 7.0.15."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from cachevault.rdb.dump_payload import crc64, restore_payload
from rdbgen import redis_server


def test_crc64_vector_and_chaining() -> None:
    assert crc64(b"123456789") == 0xE9C6D914C4B8D9CA
    assert crc64(b"6789", crc64(b"12345")) == 0xE9C6D914C4B8D9CA
    assert crc64(memoryview(b"xx123456789")[2:]) == 0xE9C6D914C4B8D9CA
    assert crc64(b"") == 0


def test_restore_payload_matches_dump_and_restores(tmp_path: Path) -> None:
    with redis_server(tmp_path / "r") as server:
        c = server.client
        values = {
            b"plain": b"hello world",
            b"empty": b"",
            b"bin": random.Random(3).randbytes(300),
        }  # incompressible: stored raw
        for key, value in values.items():
            c.set(key, value)
            # String value encoding: 1-byte length (< 64) / 14-bit length, then the bytes.
            n = len(value)
            raw = (bytes((n,)) if n < 64 else bytes((0x40 | n >> 8, n & 0xFF))) + value
            payload = restore_payload(0, raw, 10)
            assert payload == c.dump(key)
            assert payload == restore_payload(0, memoryview(bytearray(raw)), 10)
            c.restore(key + b":copy", 0, payload)
            assert c.get(key + b":copy") == value
        # A wrong CRC is refused by the server: the trailer really is checked.
        bad = bytearray(restore_payload(0, b"\x02hi", 10))
        bad[-1] ^= 1
        with pytest.raises(Exception, match="checksum"):
            c.restore("bad", 0, bytes(bad))


def test_restore_payload_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        restore_payload(256, b"", 10)
    with pytest.raises(ValueError):
        restore_payload(0, b"", 0)
