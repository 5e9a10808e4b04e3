"""Redis Cluster hash slots: key -> slot, slot-range text, even splits, slot -> shard routing.

Everything here must agree bit for bit with Redis itself (``keyHashSlot`` in cluster.c) and
with ``redis-cli --cluster create`` (which ElastiCache's default slot split matches), because
a key restored to a node that does not own its slot is answered with ``-MOVED``.
"""

from __future__ import annotations

import struct
from array import array
from binascii import crc_hqx
from collections.abc import Iterable, Sequence

from cachevault.core.errors import InvalidParameterValue

SLOT_COUNT = 16384
_SLOT_MASK = SLOT_COUNT - 1

SlotRange = tuple[int, int]


def key_slot(key: bytes | bytearray | memoryview | str) -> int:
    """Hash slot of ``key``: CRC16/XMODEM of the key, or of its ``{hashtag}``, mod 16384.

    Only the first ``{`` counts, the tag ends at the first ``}`` after it, and an empty tag
    (``foo{}{bar}``) means the whole key is hashed — exactly Redis' ``keyHashSlot``.
    """
    if isinstance(key, str):
        key = key.encode()
    elif not isinstance(key, bytes):
        key = bytes(key)
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return crc_hqx(key[start + 1 : end], 0) & _SLOT_MASK
    return crc_hqx(key, 0) & _SLOT_MASK


def _f32(x: float) -> float:
    # redis-cli does this arithmetic in C `float`; emulate single precision so large
    # shard counts round exactly as it does.
    return struct.unpack("f", struct.pack("f", x))[0]


def _lround(x: float) -> int:
    # C lround: halves round away from zero (Python's round() is banker's rounding).
    return int(x + 0.5) if x >= 0 else -int(-x + 0.5)


def even_split(shards: int) -> list[SlotRange]:
    """Split 16384 slots into ``shards`` contiguous ranges exactly like ``redis-cli --cluster create``.

    3 shards -> 0-5460, 5461-10922, 10923-16383 (the ElastiCache default layout).
    """
    if not 1 <= shards <= SLOT_COUNT:
        raise InvalidParameterValue(f"Shard count must be between 1 and {SLOT_COUNT}, got {shards}")
    per_node = _f32(SLOT_COUNT / shards)
    cursor = 0.0
    first = 0
    ranges: list[SlotRange] = []
    for i in range(shards):
        last = _lround(_f32(_f32(cursor + per_node) - 1.0))
        if last > SLOT_COUNT or i == shards - 1:
            last = SLOT_COUNT - 1
        last = max(last, first)
        ranges.append((first, last))
        first = last + 1
        cursor = _f32(cursor + per_node)
    return ranges


def parse_slot_ranges(text: str) -> list[SlotRange]:
    """Parse ``"0-5460"`` / ``"0-100,200,300-400"`` (commas or spaces) into ``[(0, 5460)]``."""
    ranges: list[SlotRange] = []
    for part in text.replace(",", " ").split():
        lo_text, sep, hi_text = part.partition("-")
        try:
            lo = int(lo_text)
            hi = int(hi_text) if sep else lo
        except ValueError:
            raise InvalidParameterValue(f"Invalid slot range {part!r} in {text!r}") from None
        if not 0 <= lo <= hi < SLOT_COUNT:
            raise InvalidParameterValue(f"Slot range {part!r} is outside 0-{SLOT_COUNT - 1} or reversed")
        ranges.append((lo, hi))
    if not ranges:
        raise InvalidParameterValue(f"No slot range in {text!r}")
    return ranges


def format_slot_ranges(ranges: Iterable[SlotRange]) -> str:
    """``[(0, 5460), (7, 7)]`` -> ``"0-5460,7"`` (ElastiCache's ``Slots`` field style)."""
    return ",".join(f"{lo}-{hi}" if hi != lo else str(lo) for lo, hi in ranges)


class SlotRouter:
    """slot -> index of the target primary that owns it, for every one of the 16384 slots.

    Built from each target's slot ranges; refuses gaps and overlaps up front, because a
    restore that silently drops or double-sends a slot is worse than one that never starts.
    """

    __slots__ = ("_owner", "shards")

    def __init__(self, ranges_per_shard: Sequence[Iterable[SlotRange]]) -> None:
        self.shards = len(ranges_per_shard)
        if not 1 <= self.shards < 0xFFFF:
            raise InvalidParameterValue(f"Unsupported shard count {self.shards}")
        unset = 0xFFFF
        owner = array("H", [unset]) * SLOT_COUNT
        for index, ranges in enumerate(ranges_per_shard):
            for lo, hi in ranges:
                if not 0 <= lo <= hi < SLOT_COUNT:
                    raise InvalidParameterValue(f"Slot range {lo}-{hi} of shard {index} is invalid")
                for slot in range(lo, hi + 1):
                    if owner[slot] != unset:
                        raise InvalidParameterValue(
                            f"Slot {slot} is assigned to both shard {owner[slot]} and shard {index}"
                        )
                    owner[slot] = index
        missing = [slot for slot in range(SLOT_COUNT) if owner[slot] == unset]
        if missing:
            raise InvalidParameterValue(
                f"{len(missing)} slots are not assigned to any shard: "
                f"{format_slot_ranges(compress_slots(missing))[:200]}"
            )
        self._owner = owner

    @classmethod
    def even(cls, shards: int) -> SlotRouter:
        return cls([[r] for r in even_split(shards)])

    def shard_of_slot(self, slot: int) -> int:
        return self._owner[slot]

    def shard_of(self, key: bytes | bytearray | memoryview | str) -> int:
        return self._owner[key_slot(key)]

    @property
    def owners(self) -> array:
        """The raw slot -> shard table (read-only use: hot loops index it directly)."""
        return self._owner


def compress_slots(slots: Iterable[int]) -> list[SlotRange]:
    """Ascending slot numbers as inclusive (start, end) runs: 1, 2, 3, 7 -> (1, 3), (7, 7)."""
    ranges: list[SlotRange] = []
    for slot in slots:
        if ranges and ranges[-1][1] == slot - 1:
            ranges[-1] = (ranges[-1][0], slot)
        else:
            ranges.append((slot, slot))
    return ranges
