"""Hash slots must match Redis' keyHashSlot and redis-cli's even split bit for bit."""

from __future__ import annotations

import itertools
from binascii import crc_hqx

import pytest
from cachevault.core.errors import InvalidParameterValue
from cachevault.nodes.slots import (
    SLOT_COUNT,
    SlotRouter,
    even_split,
    format_slot_ranges,
    key_slot,
    parse_slot_ranges,
)


def test_known_vectors_from_redis_documentation() -> None:
    # CLUSTER KEYSLOT values documented by Redis / observed on redis-server 7.0.15.
    assert key_slot(b"foo") == 12182
    assert key_slot("foo") == 12182
    assert key_slot(b"somekey") == 11058
    assert key_slot(b"") == 0
    # CRC16/XMODEM check value: crc("123456789") == 0x31C3.
    assert key_slot(b"123456789") == 0x31C3 & 16383


def test_hashtag_rules() -> None:
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers") == key_slot(b"user1000")
    # Empty first tag: the whole key is hashed.
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}".decode())
    assert key_slot(b"foo{}{bar}") != key_slot(b"bar")
    assert key_slot(b"foo{}{bar}") == crc_hqx(b"foo{}{bar}", 0) & 16383
    # Tag runs from the first '{' to the first '}' after it.
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")
    assert key_slot(b"foo{bar}{zap}") == key_slot(b"bar")
    # No closing brace: whole key.
    assert key_slot(b"foo{bar") == crc_hqx(b"foo{bar", 0) & 16383
    assert key_slot(memoryview(b"{user1}:a")) == key_slot(bytearray(b"{user1}:b"))


# Printed by `redis-cli --cluster create` (7.0.15) for 3, 4 and 5 masters; 1 and 2 follow
# the same formula (redis-cli refuses fewer than 3 masters). The property test below
# checks the general invariants for every count.
REDIS_CLI_SPLITS = {
    1: [(0, 16383)],
    2: [(0, 8191), (8192, 16383)],
    3: [(0, 5460), (5461, 10922), (10923, 16383)],
    4: [(0, 4095), (4096, 8191), (8192, 12287), (12288, 16383)],
    5: [(0, 3276), (3277, 6553), (6554, 9829), (9830, 13106), (13107, 16383)],
}


@pytest.mark.parametrize("shards", sorted(REDIS_CLI_SPLITS))
def test_even_split_matches_redis_cli(shards: int) -> None:
    assert even_split(shards) == REDIS_CLI_SPLITS[shards]


@pytest.mark.parametrize("shards", [1, 2, 3, 7, 10, 90, 250, 500, 1000])
def test_even_split_is_contiguous_and_balanced(shards: int) -> None:
    ranges = even_split(shards)
    assert len(ranges) == shards
    assert ranges[0][0] == 0 and ranges[-1][1] == SLOT_COUNT - 1
    for (_, hi), (lo, _) in itertools.pairwise(ranges):
        assert lo == hi + 1
    sizes = [hi - lo + 1 for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_even_split_rejects_bad_counts() -> None:
    with pytest.raises(InvalidParameterValue):
        even_split(0)
    with pytest.raises(InvalidParameterValue):
        even_split(SLOT_COUNT + 1)


def test_parse_and_format_round_trip() -> None:
    assert parse_slot_ranges("0-5460") == [(0, 5460)]
    assert parse_slot_ranges("0-100,200, 300-400") == [(0, 100), (200, 200), (300, 400)]
    assert format_slot_ranges([(0, 100), (200, 200), (300, 400)]) == "0-100,200,300-400"
    text = format_slot_ranges(even_split(3))
    assert text == "0-5460,5461-10922,10923-16383"
    assert parse_slot_ranges(text) == even_split(3)
    for bad in ["", "a-b", "5-1", "0-16384", "-1"]:
        with pytest.raises(InvalidParameterValue):
            parse_slot_ranges(bad)


def test_router_maps_every_slot_to_its_owner() -> None:
    router = SlotRouter.even(3)
    assert router.shards == 3
    assert router.shard_of_slot(0) == 0
    assert router.shard_of_slot(5460) == 0
    assert router.shard_of_slot(5461) == 1
    assert router.shard_of_slot(16383) == 2
    assert router.shard_of(b"foo") == 2  # slot 12182
    # Non-contiguous ownership (after resharding) works too.
    odd = SlotRouter([[(0, 99), (200, 16383)], [(100, 199)]])
    assert [odd.shard_of_slot(s) for s in (99, 100, 199, 200)] == [0, 1, 1, 0]


def test_router_refuses_gaps_and_overlaps() -> None:
    with pytest.raises(InvalidParameterValue, match="not assigned"):
        SlotRouter([[(0, 100)], [(200, 16383)]])
    with pytest.raises(InvalidParameterValue, match="both shard"):
        SlotRouter([[(0, 8192)], [(8192, 16383)]])
