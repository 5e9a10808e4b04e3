"""The seed's reading of its node's requests: RESP arrays, inline commands and the bare
newlines a replica sends its master while it loads (restore/seed.py)."""

from __future__ import annotations

import pytest
from cachevault.core.errors import RestoreFailed
from cachevault.restore.seed import SeedFailed, _Requests
from cachevault.restore.seeded import check_accounted, cut_once, seed_reads, seed_sources, seedable


class _Chunks:
    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    def recv(self, _size: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def test_requests_split_anywhere_with_keepalive_newlines_between_them() -> None:
    conn = _Chunks(b"*1\r\n$4\r\nPING\r\n\n", b"\n\n*3\r\n$8\r\nREPL", b"CONF\r\n$3\r\nACK\r\n$1\r\n0\r\n", b"PING\r\n")
    requests = iter(_Requests(conn))  # type: ignore[arg-type]
    assert next(requests) == [b"PING"]
    assert next(requests) == [b"REPLCONF", b"ACK", b"0"]
    assert next(requests) == [b"PING"]  # inline
    with pytest.raises(SeedFailed, match="closed the connection"):
        next(requests)


def test_a_request_that_is_not_resp_is_refused() -> None:
    requests = iter(_Requests(_Chunks(b"*2\r\n$4\r\nPING\r\n:12\r\n")))  # type: ignore[arg-type]
    with pytest.raises(SeedFailed, match="does not understand"):
        next(requests)


def test_module_names_from_info_modules_as_redis_py_parses_it() -> None:
    from cachevault.snapshot.capture_runner import module_names
    from redis._parsers.helpers import parse_info

    text = (
        "# Modules\r\nmodule:name=search,ver=20603,api=1,filters=0,usedby=[],using=[],options=[]\r\n"
        "module:name=ReJSON,ver=20606,api=1,filters=0,usedby=[],using=[],options=[]\r\n"
    )
    assert module_names(parse_info(text)) == ["search", "ReJSON"]
    assert module_names(parse_info("# Modules\r\n")) == []  # what a node without modules answers


def _source(key: str, slots: str | None, keys: int) -> dict[str, object]:
    return {"Bucket": "b", "Key": key, "Slots": slots, "KeyCount": keys, "Size": 10}


def test_a_cluster_seed_reads_the_sources_its_slots_need() -> None:
    three = [_source("a", "0-5460", 1), _source("b", "5461-10922", 1), _source("c", "10923-16383", 1)]
    assert [s["Key"] for s in seed_sources(three, "0-8191")] == ["a", "b"]
    assert [s["Key"] for s in seed_sources(three, "10923-12000,100")] == ["a", "c"]
    assert [s["Key"] for s in seed_sources([_source("all", None, 1)], "0-100")] == ["all"]  # no slots recorded
    # How many times over the seeds would read the sources, and so which layouts LoadShard cuts once.
    reads = {n: seed_reads(three, n) for n in (1, 2, 3, 4)}
    assert reads == {1: 1.0, 2: 4 / 3, 3: 1.0, 4: 2.0}
    assert [n for n in reads if cut_once(three, n)] == [4]
    one = [{**_source("all", None, 1), "Sha256": "ab" * 32}]
    assert [seed_reads(one, n) for n in (1, 2, 3)] == [1.0, 2.0, 3.0]
    assert [cut_once(one, n) for n in (1, 2, 3)] == [False, True, True]


def test_keys_the_seeds_did_not_account_for_fail_the_load() -> None:
    sources = [_source("a", "0-5460", 10), _source("b", "5461-16383", 7)]
    a, b = "s3://b/a", "s3://b/b"
    # [source, keys in the reader's slots, keys in the source]
    parts = [{"SourceKeys": [[a, 6, 10]]}, {"SourceKeys": [[a, 4, 10], [b, 7, 7]]}]
    check_accounted(sources, parts)
    with pytest.raises(RestoreFailed, match="holds 10 keys, but only 6 lie in the slots"):
        check_accounted(sources, parts[:1])
    with pytest.raises(RestoreFailed, match="holds 7 keys, but only 5"):  # a key of a slot b did not record
        check_accounted(sources, [parts[0], {"SourceKeys": [[a, 4, 10], [b, 5, 7]]}])
    # Two versions of one key are two sources.
    versions = [{**_source("a", None, 3), "VersionId": "1"}, {**_source("a", None, 3), "VersionId": "2"}]
    one, two = "s3://b/a?versionId=1", "s3://b/a?versionId=2"
    check_accounted(versions, [{"SourceKeys": [[one, 3, 3], [two, 3, 3]]}])
    with pytest.raises(RestoreFailed, match="versionId=2 holds 3 keys, but only 2"):
        check_accounted(versions, [{"SourceKeys": [[one, 3, 3], [two, 2, 3]]}])


def test_a_merge_of_many_sources_is_cut_once_past_the_overrides_limit() -> None:
    def shards(n: int) -> list[dict[str, object]]:
        ranges = [(i * 16384 // n, (i + 1) * 16384 // n - 1) for i in range(n)]
        return [{**_source(f"snapshots/merge/shard-{i:04d}.rdb", f"{lo}-{hi}", 1), "Sha256": "ab" * 32,
                 "Modules": [], "RdbVersion": 10} for i, (lo, hi) in enumerate(ranges)]  # fmt: skip

    event = {"ClusterMode": True, "NumNodeGroups": 1}
    assert seedable(event, shards(8)) and seedable(event, shards(40))
    assert not cut_once(shards(8), 1)  # one node's seed reads all 8: its plan fits RunTask's overrides
    assert cut_once(shards(40), 1)  # 40 sources would not: LoadShard cuts them and the seed relays
