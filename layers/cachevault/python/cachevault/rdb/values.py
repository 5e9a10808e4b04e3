"""Find where an RDB value ends, by walking its encoding and never decoding it.

The bytes between the type byte and the returned offset are exactly what DUMP
emits after the type byte, so RESTORE can take them verbatim.
"""

from __future__ import annotations

from cachevault.core.errors import RdbFormatError
from cachevault.rdb import encoding as f
from cachevault.rdb.encoding import Buffer, read_len, skip_string, truncated

# Types whose whole value is one RDB string (a ziplist/listpack/intset/zipmap blob).
_SINGLE_BLOB = frozenset(
    {
        f.T_STRING,
        f.T_HASH_ZIPMAP,
        f.T_LIST_ZIPLIST,
        f.T_SET_INTSET,
        f.T_ZSET_ZIPLIST,
        f.T_HASH_ZIPLIST,
        f.T_HASH_LISTPACK,
        f.T_ZSET_LISTPACK,
        f.T_SET_LISTPACK,
        f.T_HASH_LISTPACK_EX_PRE_GA,
    }
)
# Every value type this module can walk (MODULE_PRE_GA cannot be walked without the module).
SUPPORTED_TYPES = _SINGLE_BLOB | {
    f.T_LIST, f.T_SET, f.T_ZSET, f.T_HASH, f.T_ZSET_2, f.T_MODULE_2, f.T_LIST_QUICKLIST,
    f.T_LIST_QUICKLIST_2, f.T_STREAM_LISTPACKS, f.T_STREAM_LISTPACKS_2, f.T_STREAM_LISTPACKS_3,
    f.T_HASH_METADATA_PRE_GA, f.T_HASH_METADATA, f.T_HASH_LISTPACK_EX,
}  # fmt: skip
_QUICKLIST_PLAIN = 1
_QUICKLIST_PACKED = 2
_STREAM_ID = 16  # raw stream id in PELs: 2 x uint64 big endian
_MS_TIME = 8


def _fixed(pos: int, n: int, size: int) -> int:
    if pos + n > size:
        raise truncated(pos, n, size)
    return pos + n


def _skip_strings_checked(buf: Buffer, pos: int, size: int, count: int) -> int:
    for _ in range(count):
        pos = skip_string(buf, pos, size)
    return pos


def _skip_strings(buf: Buffer, pos: int, size: int, count: int) -> int:
    """Skip ``count`` RDB strings: the hot loop of hashtable sets/hashes and big lists.

    Short raw strings (6- and 14-bit lengths: nearly every element) are skipped inline
    without a call per element; any other encoding takes skip_string. Bounds are checked
    once at the end (an mmap raises IndexError past its end); on any problem the checked
    walk runs again from the start to raise the error with its exact offset.
    """
    start = pos
    try:
        for _ in range(count):
            b = buf[pos]
            if b < 0x40:
                pos += 1 + b
            elif b < 0x80:
                pos += 2 + (((b & 0x3F) << 8) | buf[pos + 1])
            else:
                pos = skip_string(buf, pos, size)
    except (IndexError, RdbFormatError):
        pos = size + 1
    if pos > size:
        return _skip_strings_checked(buf, start, size, count)
    return pos


def _skip_members_doubles(buf: Buffer, pos: int, size: int, count: int) -> int:
    """ZSET_2 (skiplist) members: string + 8-byte binary double each, inline like _skip_strings."""
    start = pos
    try:
        for _ in range(count):
            b = buf[pos]
            if b < 0x40:
                pos += 9 + b
            elif b < 0x80:
                pos += 10 + (((b & 0x3F) << 8) | buf[pos + 1])
            else:
                pos = skip_string(buf, pos, size) + 8
    except (IndexError, RdbFormatError):
        pos = size + 1
    if pos > size:  # the checked walk raises with the exact offset
        pos = start
        for _ in range(count):
            pos = _fixed(skip_string(buf, pos, size), 8, size)
    return pos


def skip_value(buf: Buffer, pos: int, size: int, type_byte: int) -> int:
    """Offset just past the value of type ``type_byte`` starting at ``pos``."""
    if type_byte in _SINGLE_BLOB:
        return skip_string(buf, pos, size)
    if type_byte in (f.T_LIST, f.T_SET, f.T_LIST_QUICKLIST):
        n, pos = read_len(buf, pos, size)
        return _skip_strings(buf, pos, size, n)
    if type_byte == f.T_HASH:
        n, pos = read_len(buf, pos, size)
        return _skip_strings(buf, pos, size, 2 * n)
    if type_byte == f.T_ZSET_2:
        n, pos = read_len(buf, pos, size)
        return _skip_members_doubles(buf, pos, size, n)  # member + binary double
    if type_byte == f.T_ZSET:
        n, pos = read_len(buf, pos, size)
        for _ in range(n):
            pos = _skip_ascii_double(buf, skip_string(buf, pos, size), size)
        return pos
    if type_byte == f.T_LIST_QUICKLIST_2:
        n, pos = read_len(buf, pos, size)
        for _ in range(n):
            container, cpos = read_len(buf, pos, size)
            if container not in (_QUICKLIST_PLAIN, _QUICKLIST_PACKED):
                raise RdbFormatError(f"bad quicklist container {container} at offset {pos}", offset=pos)
            pos = skip_string(buf, cpos, size)
        return pos
    if type_byte in (f.T_STREAM_LISTPACKS, f.T_STREAM_LISTPACKS_2, f.T_STREAM_LISTPACKS_3):
        return _skip_stream(buf, pos, size, type_byte)
    if type_byte == f.T_MODULE_2:
        _, pos = read_len(buf, pos, size)  # module id
        return skip_module_opcodes(buf, pos, size)
    if type_byte in (f.T_HASH_METADATA, f.T_HASH_METADATA_PRE_GA):
        if type_byte == f.T_HASH_METADATA:
            pos = _fixed(pos, _MS_TIME, size)  # min field expire time
        n, pos = read_len(buf, pos, size)
        for _ in range(n):
            _, pos = read_len(buf, pos, size)  # field ttl
            pos = _skip_strings(buf, pos, size, 2)
        return pos
    if type_byte == f.T_HASH_LISTPACK_EX:
        return skip_string(buf, _fixed(pos, _MS_TIME, size), size)
    raise unsupported_type(type_byte, pos)


def unsupported_type(type_byte: int, offset: int) -> RdbFormatError:
    name = f.TYPE_NAMES.get(type_byte, "unknown")
    return RdbFormatError(
        f"unsupported RDB value type {type_byte} ({name}) at offset {offset}",
        offset=offset,
        type_byte=type_byte,
    )


def _skip_ascii_double(buf: Buffer, pos: int, size: int) -> int:
    # Pre-v8 zset scores: one length byte, 253/254/255 = nan/+inf/-inf with no digits.
    if pos >= size:
        raise truncated(pos, 1, size)
    n = buf[pos]
    return pos + 1 if n >= 253 else _fixed(pos + 1, n, size)


def _skip_stream(buf: Buffer, pos: int, size: int, type_byte: int) -> int:
    v2 = type_byte >= f.T_STREAM_LISTPACKS_2
    nodes, pos = read_len(buf, pos, size)
    # each node: master id (string) + listpack (string)
    pos = _skip_strings(buf, pos, size, 2 * nodes)
    # length, last id ms/seq [, first id ms/seq, max deleted id ms/seq, entries added]
    for _ in range(8 if v2 else 3):
        _, pos = read_len(buf, pos, size)
    groups, pos = read_len(buf, pos, size)
    for _ in range(groups):
        pos = skip_string(buf, pos, size)  # group name
        for _ in range(3 if v2 else 2):  # last id ms/seq [, entries read]
            _, pos = read_len(buf, pos, size)
        pel, pos = read_len(buf, pos, size)
        for _ in range(pel):
            pos = _fixed(pos, _STREAM_ID + _MS_TIME, size)  # id + delivery time
            _, pos = read_len(buf, pos, size)  # delivery count
        consumers, pos = read_len(buf, pos, size)
        seen_times = 2 * _MS_TIME if type_byte >= f.T_STREAM_LISTPACKS_3 else _MS_TIME
        for _ in range(consumers):
            pos = _fixed(skip_string(buf, pos, size), seen_times, size)  # name, seen [, active]
            cpel, pos = read_len(buf, pos, size)
            pos = _fixed(pos, _STREAM_ID * cpel, size)
    return pos


def skip_module_opcodes(buf: Buffer, pos: int, size: int) -> int:
    """Walk RDB_MODULE_OPCODE_* records up to and including the EOF opcode."""
    start = pos
    for _ in range(size):  # bounded: every opcode consumes at least one byte
        opcode, pos = read_len(buf, pos, size)
        if opcode == f.MOD_EOF:
            return pos
        if opcode in (f.MOD_SINT, f.MOD_UINT):
            _, pos = read_len(buf, pos, size)
        elif opcode == f.MOD_FLOAT:
            pos = _fixed(pos, 4, size)
        elif opcode == f.MOD_DOUBLE:
            pos = _fixed(pos, 8, size)
        elif opcode == f.MOD_STRING:
            pos = skip_string(buf, pos, size)
        else:
            raise RdbFormatError(f"unknown module opcode {opcode} at offset {pos}", offset=pos)
    raise truncated(start, size - start + 1, size)
