"""DUMP/RESTORE payloads: type byte + raw value + RDB version (2 bytes LE) + CRC64 (8 bytes LE).

The CRC is Redis' CRC-64 "jones" variant (anycrc model CRC64-REDIS, ~14 GB/s);
crc64(b"123456789") == 0xE9C6D914C4B8D9CA.
"""

from __future__ import annotations

import anycrc

_MODEL = anycrc.Model("CRC64-REDIS")
# The raw anycrc call ``crc64_calc(data, crc)``: no Python frame, for per-key hot loops.
crc64_calc = _MODEL.calc
# CRC64 state after the single type byte that starts every payload, by type byte: lets a
# packer CRC the value in place (no concatenated copy) from the right starting state.
TYPE_BYTE_CRC: tuple[int, ...] = tuple(_MODEL.calc(bytes((t,))) for t in range(256))


def crc64(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC64 of ``data``, continuing from ``crc`` (0 to start)."""
    return _MODEL.calc(data, crc)


def restore_payload(type_byte: int, value: bytes | memoryview, rdb_version: int) -> bytes:
    """The serialized value RESTORE expects, byte-identical to DUMP on a same-config server."""
    if not 0 <= type_byte <= 255:
        raise ValueError(f"type byte out of range: {type_byte}")
    if not 0 < rdb_version <= 0xFFFF:
        raise ValueError(f"RDB version out of range: {rdb_version}")
    tail = rdb_version.to_bytes(2, "little")
    # CRC the parts in place so the value is copied exactly once, into the result.
    crc = crc64_calc(tail, crc64_calc(value, TYPE_BYTE_CRC[type_byte]))
    return b"".join((bytes((type_byte,)), value, tail, crc.to_bytes(8, "little")))
