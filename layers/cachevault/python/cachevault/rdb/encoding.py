"""RDB wire primitives: opcodes, type bytes, length/string encodings, LZF.

Everything here works on a read-only buffer (an mmap) by offset and returns the
next offset, so the reader can walk values without building Python objects.
Facts follow redis src/rdb.h (RDB v12) and valkey src/rdb.h (RDB v11).
"""

from __future__ import annotations

import mmap

from cachevault.core.errors import RdbFormatError

MAGIC = b"REDIS"
HEADER_LEN = 9  # "REDIS" + 4 ASCII digits
MAX_VERSION = 12

# Opcodes (a byte where a value type would be).
OP_SLOT_INFO = 244  # Redis 7.4+ cluster: slot id, keys, expires (three lengths)
OP_FUNCTION2 = 245
OP_FUNCTION_PRE_GA = 246  # 7.0 release candidates only
OP_MODULE_AUX = 247
OP_IDLE = 248
OP_FREQ = 249
OP_AUX = 250
OP_RESIZEDB = 251
OP_EXPIRETIME_MS = 252
OP_EXPIRETIME = 253
OP_SELECTDB = 254
OP_EOF = 255

# Value types.
T_STRING = 0
T_LIST = 1
T_SET = 2
T_ZSET = 3
T_HASH = 4
T_ZSET_2 = 5
T_MODULE_PRE_GA = 6
T_MODULE_2 = 7
T_HASH_ZIPMAP = 9
T_LIST_ZIPLIST = 10
T_SET_INTSET = 11
T_ZSET_ZIPLIST = 12
T_HASH_ZIPLIST = 13
T_LIST_QUICKLIST = 14
T_STREAM_LISTPACKS = 15
T_HASH_LISTPACK = 16
T_ZSET_LISTPACK = 17
T_LIST_QUICKLIST_2 = 18
T_STREAM_LISTPACKS_2 = 19
T_SET_LISTPACK = 20  # v11
T_STREAM_LISTPACKS_3 = 21  # v11
T_HASH_METADATA_PRE_GA = 22  # v12 (7.4 RC)
T_HASH_LISTPACK_EX_PRE_GA = 23  # v12 (7.4 RC)
T_HASH_METADATA = 24  # v12
T_HASH_LISTPACK_EX = 25  # v12

TYPE_NAMES: dict[int, str] = {
    T_STRING: "string",
    T_LIST: "list",
    T_SET: "set",
    T_ZSET: "zset",
    T_HASH: "hash",
    T_ZSET_2: "zset2",
    T_MODULE_PRE_GA: "module-pre-ga",
    T_MODULE_2: "module2",
    T_HASH_ZIPMAP: "hash-zipmap",
    T_LIST_ZIPLIST: "list-ziplist",
    T_SET_INTSET: "set-intset",
    T_ZSET_ZIPLIST: "zset-ziplist",
    T_HASH_ZIPLIST: "hash-ziplist",
    T_LIST_QUICKLIST: "list-quicklist",
    T_STREAM_LISTPACKS: "stream-listpacks",
    T_HASH_LISTPACK: "hash-listpack",
    T_ZSET_LISTPACK: "zset-listpack",
    T_LIST_QUICKLIST_2: "list-quicklist2",
    T_STREAM_LISTPACKS_2: "stream-listpacks2",
    T_SET_LISTPACK: "set-listpack",
    T_STREAM_LISTPACKS_3: "stream-listpacks3",
    T_HASH_METADATA_PRE_GA: "hash-metadata-pre-ga",
    T_HASH_LISTPACK_EX_PRE_GA: "hash-listpack-ex-pre-ga",
    T_HASH_METADATA: "hash-metadata",
    T_HASH_LISTPACK_EX: "hash-listpack-ex",
}

# The data type each encoding holds: a server may load a value into another encoding of the same
# type (an older RDB's ziplist as a listpack, a set past its listpack limits as a hashtable).
TYPE_FAMILY: dict[int, str] = {
    T_STRING: "string",
    **dict.fromkeys((T_LIST, T_LIST_ZIPLIST, T_LIST_QUICKLIST, T_LIST_QUICKLIST_2), "list"),
    **dict.fromkeys((T_SET, T_SET_INTSET, T_SET_LISTPACK), "set"),
    **dict.fromkeys((T_ZSET, T_ZSET_2, T_ZSET_ZIPLIST, T_ZSET_LISTPACK), "zset"),
    **dict.fromkeys(
        (T_HASH, T_HASH_ZIPMAP, T_HASH_ZIPLIST, T_HASH_LISTPACK, T_HASH_METADATA_PRE_GA, T_HASH_LISTPACK_EX_PRE_GA,
         T_HASH_METADATA, T_HASH_LISTPACK_EX),
        "hash",
    ),
    **dict.fromkeys((T_STREAM_LISTPACKS, T_STREAM_LISTPACKS_2, T_STREAM_LISTPACKS_3), "stream"),
    **dict.fromkeys((T_MODULE_PRE_GA, T_MODULE_2), "module"),
}

# Module value opcodes (RDB_MODULE_OPCODE_*), written by modules with RDB_TYPE_MODULE_2.
MOD_EOF = 0
MOD_SINT = 1
MOD_UINT = 2
MOD_FLOAT = 3
MOD_DOUBLE = 4
MOD_STRING = 5

_MODULE_CHARSET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


# What the walkers read: indexing gives an int, slicing gives bytes.
Buffer = mmap.mmap | bytes


def truncated(at: int, need: int, size: int) -> RdbFormatError:
    err = RdbFormatError(
        f"RDB truncated at offset {at}: needs {need} byte(s) but the file ends at offset {size}",
        offset=at,
    )
    # A streaming reader (rdb.RdbStream) tells "read more" from a real format error by this.
    err.truncated = True
    return err


def read_len(buf: Buffer, pos: int, size: int) -> tuple[int, int]:
    """A plain length (never a special encoding) at ``pos`` -> (value, next offset)."""
    if pos >= size:
        raise truncated(pos, 1, size)
    b = buf[pos]
    kind = b >> 6
    if kind == 0:
        return b & 0x3F, pos + 1
    if kind == 1:
        if pos + 2 > size:
            raise truncated(pos, 2, size)
        return ((b & 0x3F) << 8) | buf[pos + 1], pos + 2
    if b == 0x80:
        if pos + 5 > size:
            raise truncated(pos, 5, size)
        return int.from_bytes(buf[pos + 1 : pos + 5], "big"), pos + 5
    if b == 0x81:
        if pos + 9 > size:
            raise truncated(pos, 9, size)
        return int.from_bytes(buf[pos + 1 : pos + 9], "big"), pos + 9
    raise RdbFormatError(f"invalid length byte 0x{b:02x} at offset {pos}", offset=pos)


def skip_string(buf: Buffer, pos: int, size: int) -> int:
    """Skip one RDB string (raw, int-encoded or LZF) without copying it."""
    if pos >= size:
        raise truncated(pos, 1, size)
    b = buf[pos]
    kind = b >> 6
    if kind == 0:
        end = pos + 1 + (b & 0x3F)
    elif kind == 1:
        if pos + 2 > size:
            raise truncated(pos, 2, size)
        end = pos + 2 + (((b & 0x3F) << 8) | buf[pos + 1])
    elif kind == 3:
        enc = b & 0x3F
        if enc == 0:
            end = pos + 2
        elif enc == 1:
            end = pos + 3
        elif enc == 2:
            end = pos + 5
        elif enc == 3:
            clen, p = read_len(buf, pos + 1, size)
            _, p = read_len(buf, p, size)
            end = p + clen
        else:
            raise RdbFormatError(f"unknown string encoding {enc} at offset {pos}", offset=pos)
    else:
        n, p = read_len(buf, pos, size)
        end = p + n
    if end > size:
        raise truncated(pos, end - pos, size)
    return end


def read_string(buf: Buffer, pos: int, size: int) -> tuple[bytes, int]:
    """Decode one RDB string (keys, aux fields, function code) -> (bytes, next offset)."""
    if pos >= size:
        raise truncated(pos, 1, size)
    b = buf[pos]
    if b >> 6 == 3:
        enc = b & 0x3F
        if enc in (0, 1, 2):
            width = 1 << enc
            if pos + 1 + width > size:
                raise truncated(pos, 1 + width, size)
            raw = bytes(buf[pos + 1 : pos + 1 + width])
            return str(int.from_bytes(raw, "little", signed=True)).encode(), pos + 1 + width
        if enc == 3:
            clen, p = read_len(buf, pos + 1, size)
            ulen, p = read_len(buf, p, size)
            if p + clen > size:
                raise truncated(p, clen, size)
            return lzf_decompress(bytes(buf[p : p + clen]), ulen, p), p + clen
        raise RdbFormatError(f"unknown string encoding {enc} at offset {pos}", offset=pos)
    n, p = read_len(buf, pos, size)
    if p + n > size:
        raise truncated(p, n, size)
    return bytes(buf[p : p + n]), p + n


def lzf_decompress(data: bytes, expected_len: int, offset: int = 0) -> bytes:
    """LZF (liblzf) decompression; only used for short strings such as keys and aux fields."""
    out = bytearray()
    i, n = 0, len(data)
    try:
        while i < n:
            ctrl = data[i]
            i += 1
            if ctrl < 32:  # literal run of ctrl+1 bytes
                out += data[i : i + ctrl + 1]
                i += ctrl + 1
                continue
            length = ctrl >> 5
            if length == 7:
                length += data[i]
                i += 1
            ref = len(out) - ((ctrl & 0x1F) << 8) - data[i] - 1
            i += 1
            if ref < 0:
                raise IndexError
            for _ in range(length + 2):  # byte by byte: the copy may overlap itself
                out.append(out[ref])
                ref += 1
    except IndexError:
        raise RdbFormatError(f"corrupt LZF string at offset {offset}", offset=offset) from None
    if len(out) != expected_len:
        raise RdbFormatError(
            f"LZF string at offset {offset} expands to {len(out)} bytes, header says {expected_len}",
            offset=offset,
        )
    return bytes(out)


def module_name(module_id: int) -> str:
    """The 9-character module type name packed in a 64-bit module id (low 10 bits: encver)."""
    mid = module_id >> 10
    chars = []
    for _ in range(9):
        chars.append(_MODULE_CHARSET[mid & 63])
        mid >>= 6
    return "".join(reversed(chars))


def module_id(name: str, encver: int) -> int:
    """Inverse of :func:`module_name` (for tests and fixtures)."""
    if len(name) != 9:
        raise ValueError("module type names are exactly 9 characters")
    mid = 0
    for ch in name:
        mid = (mid << 6) | _MODULE_CHARSET.index(ch)
    return (mid << 10) | (encver & 1023)
