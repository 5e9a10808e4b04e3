"""Post-restore verification: key counts per target primary and a sampled DUMP comparison.

Counts come from INFO keyspace (all databases). The content check DUMPs sampled keys on
the primary that owns them and compares with the payload that was restored. The value
bytes (everything before the 2-byte RDB version + CRC64 trailer) are compared, so a
target on a newer RDB version still compares. Hash-table encoded sets and hashes are
serialized in dict order, which depends on each server's random hash seed, so for those
an equal type byte and equal size is what can be checked without decoding;
``cache_digest``/``combined_digest`` give the order-independent whole-dataset check.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from cachevault.core.errors import RestoreFailed
from cachevault.nodes.slots import SlotRouter
from cachevault.rdb.encoding import TYPE_FAMILY
from cachevault.restore.load import RestoreEntry, TargetShard

_TRAILER = 10  # 2-byte RDB version + 8-byte CRC64
# RDB_TYPE_SET, RDB_TYPE_HASH: dict iteration order is per-process random.
_UNORDERED_TYPES = frozenset({2, 4})
_DUMP_CHUNK = 200
RE_ENCODED = "ReEncoded"  # a sample of the right type in another encoding: counted, not a mismatch

Sample = tuple[int, bytes, bytes | memoryview] | RestoreEntry


def _client(t: TargetShard, db: int, timeout: float) -> redis.Redis:
    return redis.Redis(
        host=t.host,
        port=t.port,
        db=db,
        **t.credentials.redis_kwargs(),  # AUTH and TLS as the target needs
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 10.0),
    )


def keyspace_keys(t: TargetShard, *, timeout: float = 60.0) -> int:
    """Keys in all databases of one node (INFO keyspace)."""
    client = _client(t, 0, timeout)
    try:
        info = client.info("keyspace")
    finally:
        client.close()
    return sum(int(v["keys"]) for k, v in info.items() if k.startswith("db"))


def _compare(expected: bytes | memoryview, actual: bytes) -> str | None:
    """None when equal enough; else the reason."""
    want = bytes(expected)
    if want == actual:
        return None
    if want[:-_TRAILER] == actual[:-_TRAILER]:
        return None  # same value, target serialized it with another RDB version
    if want[:1] == actual[:1] and want[0] in _UNORDERED_TYPES and len(want) == len(actual):
        return None
    if want[:1] != actual[:1] and TYPE_FAMILY.get(want[0], "?") == TYPE_FAMILY.get(actual[0]):
        return RE_ENCODED  # the target holds it in another encoding: its bytes cannot be compared
    return "ValueDiffers"


SAMPLES_PER_SOURCE = 40  # sampled keys a load keeps per source for Verify, with few sources
SAMPLE_LIMIT = 1000  # sampled keys Verify compares in all (DUMP on the nodes)
SAMPLE_MAX_PAYLOAD = 2048  # bytes of one sample's DUMP payload kept for Verify


def samples_per_source(sources: int) -> int:
    """Samples to keep of each source: SAMPLES_PER_SOURCE, fewer when there are many sources, so
    that Verify, which compares SAMPLE_LIMIT in all, checks some of every source."""
    return max(1, min(SAMPLES_PER_SOURCE, SAMPLE_LIMIT // max(1, sources)))


def sample_record(db: int, key: bytes, payload: bytes, expire_ms: int | None) -> dict[str, Any]:
    """One sampled key as a load keeps it for Verify (JSON, in the load's details in S3)."""
    return {
        "Db": db,
        "Key": base64.b64encode(bytes(key)).decode(),
        "Payload": base64.b64encode(payload).decode(),
        "ExpireMs": expire_ms,
    }


def verify_restore(
    targets: Sequence[TargetShard],
    *,
    expected_keys_per_target: Sequence[int],
    samples: Iterable[Sample] | None = None,
    sample_limit: int = SAMPLE_LIMIT,
    keys_with_ttl_per_target: Sequence[int] | None = None,
    now_ms: int | None = None,
    timeout: float = 60.0,
    raise_on_mismatch: bool = True,
) -> dict[str, Any]:
    """Compare key counts and sampled values on the target primaries with what was restored.

    ``keys_with_ttl_per_target`` (from LoadStats) lets a count fall short by keys that
    carried an expiry, since those may expire between load and verification. Samples may be
    ``(db, key, payload)`` or RestoreEntry; a RestoreEntry whose expiry has passed is allowed
    to be missing. With more than one target, samples are routed by hash slot.
    """
    if len(expected_keys_per_target) != len(targets):
        raise ValueError("expected_keys_per_target needs one count per target")
    mismatches: list[dict[str, Any]] = []
    counts: list[dict[str, Any]] = []
    for i, t in enumerate(targets):
        actual = keyspace_keys(t, timeout=timeout)
        expected = expected_keys_per_target[i]
        volatile = keys_with_ttl_per_target[i] if keys_with_ttl_per_target else 0
        counts.append({"Target": t.address, "Expected": expected, "Actual": actual})
        if not expected - volatile <= actual <= expected:
            mismatches.append(
                {"Target": t.address, "Reason": "KeyCount", "Expected": expected, "Actual": actual}
            )

    router = SlotRouter([t.slots for t in targets]) if len(targets) > 1 else None
    groups: dict[tuple[int, int], list[tuple[bytes, bytes | memoryview, int | None]]] = {}
    sampled = 0
    for item in itertools.islice(samples or (), sample_limit):
        if isinstance(item, RestoreEntry):
            db, key, payload, expire = item.db, item.key, item.payload, item.expire_ms
        else:
            (db, key, payload), expire = item, None
        owner = router.shard_of(key) if router else 0
        groups.setdefault((owner, db), []).append((bytes(key), payload, expire))
        sampled += 1

    expired = re_encoded = 0
    for (owner, db), items in groups.items():
        t = targets[owner]
        client = _client(t, db, timeout)
        try:
            for start in range(0, len(items), _DUMP_CHUNK):
                chunk = items[start : start + _DUMP_CHUNK]
                pipe = client.pipeline(transaction=False)
                for key, _, _ in chunk:
                    pipe.dump(key)
                dumps = pipe.execute()
                for (key, payload, expire), dumped in zip(chunk, dumps, strict=True):
                    if dumped is None:
                        if expire is not None and expire <= (now_ms or _now_ms()):
                            expired += 1
                            continue
                        reason: str | None = "Missing"
                    else:
                        reason = _compare(payload, dumped)
                    if reason == RE_ENCODED:
                        re_encoded += 1
                    elif reason:
                        mismatches.append(
                            {
                                "Target": t.address,
                                "Db": db,
                                "Key": key.decode("utf-8", "backslashreplace")[:200],
                                "Reason": reason,
                            }
                        )
        finally:
            client.close()

    report = {
        "Compared": "keys per primary (INFO keyspace)"
        + (" and DUMP of sampled keys vs restored payload" if sampled else ""),
        "KeyCounts": counts,
        "SampledKeys": sampled,
        "SampledExpired": expired,
        # Of the right type but in another encoding than the sample's (an older RDB's ziplist
        # loaded as a listpack, other size limits on the target): compared by type only.
        "SampledReEncoded": re_encoded,
        "Mismatches": mismatches,
    }
    if mismatches and raise_on_mismatch:
        first = mismatches[0]
        raise RestoreFailed(
            f"Restore verification failed: {len(mismatches)} mismatch(es); first: {first}", **report
        )
    return report


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def cache_digest(hosts: Iterable[TargetShard | tuple[str, int]], *, timeout: float = 120.0) -> list[str]:
    """``DEBUG DIGEST`` of every node (needs ``enable-debug-command`` yes/local on the node)."""
    digests: list[str] = []
    for h in hosts:
        t = h if isinstance(h, TargetShard) else TargetShard(h[0], h[1])
        client = _client(t, 0, timeout)
        try:
            value = client.execute_command("DEBUG", "DIGEST")
        finally:
            client.close()
        digests.append(value.decode() if isinstance(value, bytes) else str(value))
    return digests


_EMPTY = "0" * 40


def combined_digest(digests: Iterable[str]) -> str:
    """The DEBUG DIGEST one node would report holding the union of these db-0-only nodes.

    Redis' digest of a database is sha1(sha1(db id)) XOR the digest of every key, so the
    key parts of several shards combine by XOR; only the per-database constant must be
    counted once. Lets a 3-shard source be compared with a 2-shard target.
    """
    db0 = int.from_bytes(hashlib.sha1(hashlib.sha1(bytes(4)).digest()).digest(), "big")
    total = 0
    nonempty = 0
    for d in digests:
        if d == _EMPTY:
            continue
        nonempty += 1
        total ^= int(d, 16) ^ db0
    if not nonempty:
        return _EMPTY
    return f"{total ^ db0:040x}"
