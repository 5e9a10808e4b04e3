"""RestoreSnapshot end to end: the real state machine, handlers, S3, DynamoDB and redis-server nodes.

Snapshots are made with the product's own CreateSnapshot (``ControlPlane.create_snapshot``)
and restored with ``ControlPlane.restore``; every comparison is against what the source
cache held when it was snapshotted: DEBUG DIGEST (per shard for the same layout, combined
over the primaries otherwise), FUNCTION LIST on every target primary, absolute expiry
times, stream consumer groups and their pending entries. Each test also checks what the
catalog says afterwards and that the snapshot's S3 objects were not touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from cachevault.catalog import caches, storage
from cachevault.core.aws import client
from cachevault.core.errors import CacheVaultError, ChecksumMismatch, InvalidS3Location, RestoreFailed
from cachevault.nodes.slots import SlotRouter, key_slot
from cachevault.rdb.reader import RdbFile
from cachevault.restore.verify import cache_digest, combined_digest
from cachevault_tools import datagen
from cachevault_tools.cli.restore_cmd import how_loaded
from cachevault_tools.local import ecs, lambda_runtime
from cachevault_tools.local.redis_process import process_alive

from tests.product_fixtures import Product, connect, fill, host_port, sync_replicas, wait_until

LIBRARY = """#!lua name=cvtest
redis.register_function('cvt_get', function(keys, args) return redis.call('GET', keys[1]) end)
redis.register_function{function_name='cvt_len', callback=function(keys, args)
  return redis.call('STRLEN', keys[1]) end, flags={'no-writes'}}
"""
TTL_KEYS = 60  # strings with an expiry, checked one by one with PEXPIRETIME
STREAMS = 6


# ------------------------------------------------------------------------------ helpers
def _primaries(cache: dict[str, Any]) -> list[str]:
    return list(cache["Endpoints"])


def _write_rich(product: Product, cache: dict[str, Any], seed: int) -> list[bytes]:
    """Every core type (small and large encodings), TTLs, streams with groups + PEL, a library.

    Keys go straight to the primary owning their slot. Returns the keys with an expiry.
    """
    shards = product.primary_slots(cache["CacheName"])
    router = SlotRouter([[slots] for _, slots in shards]) if cache["ClusterMode"] else None
    conns = [connect(p) for p in _primaries(cache)]
    pipes = [c.pipeline(transaction=False) for c in conns]
    rnd = os.urandom

    def pipe(key: bytes) -> Any:
        return pipes[router.shard_of(key) if router else 0]

    ttl_keys: list[bytes] = []
    far = int(time.time() * 1000) + 3_600_000
    for i in range(1500):
        key = b"s:%d:%d" % (seed, i)
        if i % 25 == 0 and len(ttl_keys) < TTL_KEYS:
            pipe(key).set(key, rnd(40), pxat=far + i * 7)
            ttl_keys.append(key)
        elif i % 3 == 0:
            pipe(key).set(key, i * 1000)  # int-encoded
        else:
            pipe(key).set(key, rnd(20 + i % 300))
    for i in range(200):
        key = b"h:%d:%d" % (seed, i)
        fields = 200 if i % 20 == 0 else 6  # hashtable vs listpack
        pipe(key).hset(key, mapping={b"f%d" % f: rnd(12) for f in range(fields)})
        key = b"l:%d:%d" % (seed, i)
        pipe(key).rpush(key, *[rnd(10) for _ in range(30 if i % 10 else 400)])
        key = b"is:%d:%d" % (seed, i)
        pipe(key).sadd(key, *range(i, i + 40))  # intset
        key = b"st:%d:%d" % (seed, i)
        pipe(key).sadd(key, *[rnd(16) for _ in range(5 if i % 10 else 300)])
        key = b"z:%d:%d" % (seed, i)
        pipe(key).zadd(key, {rnd(8): j * 0.5 for j in range(8 if i % 10 else 300)})
    for i in range(30):  # hashtags: many keys in one slot
        key = b"{user%d}:profile:%d" % (seed, i)
        pipe(key).hset(key, mapping={"name": f"n{i}", "age": i})
    for p in pipes:
        p.execute()
    for i in range(STREAMS):
        key = b"x:%d:%d" % (seed, i)
        target = conns[router.shard_of(key) if router else 0]
        for j in range(50):
            target.xadd(key, {"n": j, "v": rnd(16)})
        target.xgroup_create(key, "grp", id="0")
        target.xreadgroup("grp", "consumer-1", {key: ">"}, count=17)  # 17 pending entries
        target.xgroup_create(key, "grp2", id="$")
    for c in conns:
        c.function_load(LIBRARY, replace=True)
        c.close()
    return ttl_keys


@dataclass
class Source:
    """What a source cache held when it was snapshotted (the cache may be gone since)."""

    snapshot: str
    cache_name: str
    cluster_mode: bool
    shards: int
    digests: list[str]
    keys: int
    functions: Any
    expiries: dict[bytes, int]
    groups: dict[bytes, list[tuple[bytes, int]]]
    s3_objects: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def combined(self) -> str:
        return combined_digest(self.digests)


def _function_list(address: str) -> dict[bytes, tuple[bytes, list[tuple[Any, ...]], bytes]]:
    """FUNCTION LIST WITHCODE as library -> (engine, functions, code).

    A library keeps its functions in a dict, so their listing order differs between two
    processes: they are sorted here.
    """
    conn = connect(address)
    try:
        libraries = conn.function_list(withcode=True)
    finally:
        conn.close()
    out = {}
    for raw in libraries:
        lib = dict(zip(raw[::2], raw[1::2], strict=True))
        functions = sorted(
            (f[b"name"], f[b"description"], tuple(sorted(f[b"flags"])))
            for f in (dict(zip(fn[::2], fn[1::2], strict=True)) for fn in lib[b"functions"])
        )
        out[lib[b"library_name"]] = (lib[b"engine"], functions, lib[b"library_code"])
    return out


def _run_on_owner(addresses: list[str], key: bytes, call: Callable[[redis.Redis], Any]) -> Any:
    """Run ``call`` on the primary that holds ``key`` (exactly one must)."""
    found = []
    for address in addresses:
        conn = connect(address)
        try:
            if conn.exists(key):
                found.append(call(conn))
        except redis.exceptions.MovedError:
            pass  # a cluster node answers for its own slots only
        finally:
            conn.close()
    assert len(found) == 1, f"{key!r} is on {len(found)} primaries"
    return found[0]


def _expiries(addresses: list[str], keys: list[bytes]) -> dict[bytes, int]:
    return {k: _run_on_owner(addresses, k, lambda c, k=k: c.execute_command("PEXPIRETIME", k)) for k in keys}


def _groups(addresses: list[str], seed: int) -> dict[bytes, list[tuple[bytes, int]]]:
    out = {}
    for i in range(STREAMS):
        key = b"x:%d:%d" % (seed, i)
        info = _run_on_owner(addresses, key, lambda c, k=key: c.xinfo_groups(k))
        out[key] = sorted((g["name"], int(g["pending"])) for g in info)
    return out


def _s3_objects(product: Product, snapshot: str) -> dict[str, tuple[str, int]]:
    """ETag and size of every object of a snapshot (restoring must leave them as they are)."""
    bucket = product.control.catalog.get_snapshot(snapshot).get("Bucket") or product.bucket
    listing = client("s3").list_objects_v2(Bucket=bucket, Prefix=storage.snapshot_prefix(snapshot))
    return {o["Key"]: (o["ETag"], int(o["Size"])) for o in listing.get("Contents", [])}


def _misplaced_keys(product: Product, name: str) -> list[tuple[str, bytes]]:
    """Keys a cluster primary holds in a slot it does not own (clients could never reach them)."""
    wrong = []
    for index, (address, slots) in enumerate(product.primary_slots(name), start=1):
        lo, hi = slots or (0, 0)
        conn = connect(address)
        try:
            wrong += [(f"{index:04d}", k) for k in conn.scan_iter(count=1000) if not lo <= key_slot(k) <= hi]
        finally:
            conn.close()
    return wrong


def _keycount(addresses: list[str]) -> int:
    total = 0
    for address in addresses:
        conn = connect(address)
        try:
            total += conn.dbsize()
        finally:
            conn.close()
    return total


def _make_source(
    product: Product, prefix: str, *, cluster_mode: bool, shards: int, seed: int, node_type: str | None = None
) -> Source:
    name = f"{prefix}-src"
    extra = {"node_type": node_type} if node_type else {}
    cache = caches.create_local_cache(
        name, cluster_mode=cluster_mode, num_shards=shards, replicas=1, settings=product.settings, **extra
    )
    ttl_keys = _write_rich(product, cache, seed)
    primaries = _primaries(cache)
    for p in primaries:
        sync_replicas(p, 1)
    source = Source(
        snapshot=f"{prefix}-snap",
        cache_name=cache["CacheName"],
        cluster_mode=cluster_mode,
        shards=shards,
        digests=cache_digest([host_port(p) for p in primaries]),
        keys=_keycount(primaries),
        functions=_function_list(primaries[0]),
        expiries=_expiries(primaries, ttl_keys),
        groups=_groups(primaries, seed),
    )
    assert b"cvtest" in source.functions
    assert all(_function_list(p) == source.functions for p in primaries)
    product.control.create_snapshot(cache["CacheName"], source.snapshot)
    record = product.control.wait_snapshot(source.snapshot, timeout_s=60)
    assert record["SnapshotStatus"] == "available"
    source.s3_objects = _s3_objects(product, source.snapshot)
    assert len([k for k in source.s3_objects if k.endswith(".rdb")]) == shards
    return source


def _delete_cache(product: Product, name: str) -> None:
    if product.control.catalog.find_cache(name) is not None:
        caches.delete_local_cache(name, product.settings)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def standalone(product: Product) -> Iterator[Source]:
    """A cluster-mode-disabled snapshot whose source cache is deleted right after the snapshot.

    Every restore from it therefore also proves that restoring needs only the snapshot.
    """
    source = _make_source(product, "rsa", cluster_mode=False, shards=1, seed=11)
    caches.delete_local_cache(source.cache_name, product.settings)
    yield source


@pytest.fixture(scope="module")
def clustered(product: Product) -> Iterator[Source]:
    source = _make_source(product, "rsc", cluster_mode=True, shards=3, seed=22)
    yield source
    _delete_cache(product, source.cache_name)


@pytest.fixture
def targets(product: Product) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for name in made:
        _delete_cache(product, name)


def _restore(product: Product, made: list[str], target: str, **kwargs: Any) -> tuple[dict[str, Any], float]:
    made.append(target)
    started = time.monotonic()
    arn, name = product.control.restore(target, **kwargs)
    output = product.control.wait_restore(arn, name, timeout_s=120)
    return output, time.monotonic() - started


def _check_restored(product: Product, source: Source, target: str, *, shards: int, cluster: bool) -> list[str]:
    """Everything a restore must give back, compared with the source as snapshotted."""
    record = product.control.catalog.get_cache(target)
    assert record["Status"] == "available"
    assert record["NumNodeGroups"] == shards
    assert record["ClusterMode"] is cluster
    primaries = _primaries(record)
    assert len(primaries) == shards
    digests = cache_digest([host_port(p) for p in primaries])
    if shards == source.shards and cluster == source.cluster_mode:
        assert digests == source.digests  # same layout: shard for shard
    assert combined_digest(digests) == source.combined
    assert _keycount(primaries) == source.keys
    if cluster:
        assert _misplaced_keys(product, target) == []
    for p in primaries:
        assert _function_list(p) == source.functions, f"FUNCTION LIST differs on {p}"
    assert _expiries(primaries, list(source.expiries)) == source.expiries  # ABSTTL: same deadlines
    seed = int(next(iter(source.groups)).split(b":")[1])
    assert _groups(primaries, seed) == source.groups
    assert not (product.settings.state_dir / "restore-staging" / target).exists()  # staged RDBs removed
    # Restoring never changes the snapshot.
    snapshot = product.control.describe_snapshot(source.snapshot)
    assert snapshot["SnapshotStatus"] == "available"
    assert _s3_objects(product, source.snapshot) == source.s3_objects
    return primaries


# ------------------------------------------------------------------------------ 1: round trips
def test_cluster_disabled_to_same_without_the_source_cache(
    product: Product, standalone: Source, targets: list[str]
) -> None:
    assert product.control.catalog.find_cache(standalone.cache_name) is None  # source deleted
    assert product.running_tasks(standalone.cache_name) == []  # its nodes stopped with it
    output, seconds = _restore(product, targets, "rt-same", snapshot=standalone.snapshot)
    assert output["Seeded"] is True  # one RDB into a new standalone cache: each node loads it from its seed
    assert output["LoadSummary"]["KeysLoaded"] == standalone.keys
    assert output["Status"] == "available" and output["ClusterMode"] is False
    assert output["Verification"]["Mismatches"] == []
    assert output["Verification"]["KeysExpected"] == standalone.keys
    _check_restored(product, standalone, "rt-same", shards=1, cluster=False)
    record = product.control.catalog.get_cache("rt-same")
    assert record["ReplicasPerNodeGroup"] == 1
    replica = next(n["Address"] for n in record["Nodes"] if n["Role"] == "replica")
    sync_replicas(record["Endpoints"][0], 1)
    assert cache_digest([host_port(replica)]) == standalone.digests
    primary = next(n["Address"] for n in record["Nodes"] if n["Role"] == "primary")
    conn = connect(primary)
    try:  # the replica loaded the same stream from its own seed and resynced partially with the primary
        stats = conn.info("stats")
        assert (stats["sync_full"], stats["sync_partial_ok"]) == (0, 1)
        listed = [v for k, v in conn.info("replication").items() if k.startswith("slave")]
        assert [f"{r['ip']}:{r['port']}" for r in listed] == [replica]
    finally:
        conn.close()
    print(f"restore cluster-disabled -> same (seeded): {seconds:.2f} s")


@contextlib.contextmanager
def _seeding_off(product: Product) -> Iterator[None]:
    """RESTORE_SEED_NODES=false on ProvisionCache, for the restores started inside."""
    provision = product.env.deployed.function_name("RestoreProvisionFunction")
    lam = client("lambda")
    env = lam.get_function_configuration(FunctionName=provision)["Environment"]["Variables"]
    unseeded = {**env, "RESTORE_SEED_NODES": "false"}
    lam.update_function_configuration(FunctionName=provision, Environment={"Variables": unseeded})
    try:
        yield
    finally:
        lam.update_function_configuration(FunctionName=provision, Environment={"Variables": env})


def test_cluster_disabled_to_same_through_restore_when_seeding_is_off(
    product: Product, standalone: Source, targets: list[str]
) -> None:
    """RESTORE_SEED_NODES=false: the same restore goes through RESTORE into empty nodes, replicas following."""
    with _seeding_off(product):
        output, _ = _restore(product, targets, "rt-unseeded", snapshot=standalone.snapshot)
    assert output["Seeded"] is False
    assert output["LoadSummary"]["BytesSent"] > 0  # loaded over the network
    assert how_loaded(output) == "loaded over the network (RESTORE)"
    _check_restored(product, standalone, "rt-unseeded", shards=1, cluster=False)
    record = product.control.catalog.get_cache("rt-unseeded")
    replica = next(n["Address"] for n in record["Nodes"] if n["Role"] == "replica")
    conn = connect(replica)
    try:  # it joined the empty primary and loaded the replication stream as it read it
        assert conn.config_get("repl-diskless-load")["repl-diskless-load"] == "on-empty-db"
    finally:
        conn.close()


def test_a_seeded_node_refuses_an_object_that_is_not_the_snapshot(
    product: Product, new_cache: Any, targets: list[str]
) -> None:
    """The seed checks the object's SHA-256 against the manifest before its last bytes go out: a
    changed RDB never finishes loading anywhere, and the restore fails as a checksum mismatch."""
    cache = new_cache("tamper", replicas=0)
    fill(cache["Endpoints"][0], keys=300, seed=4)
    product.control.create_snapshot(cache["CacheName"], "tamper-snap")
    product.control.wait_snapshot("tamper-snap", timeout_s=60)
    s3 = client("s3")
    (key,) = [k for k in _s3_objects(product, "tamper-snap") if k.endswith(".rdb")]
    body = s3.get_object(Bucket=product.bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=product.bucket, Key=key, Body=body[:200] + bytes([body[200] ^ 1]) + body[201:])

    targets.append("rt-tamper")
    arn, name = product.control.restore("rt-tamper", snapshot="tamper-snap", replicas=1)
    with pytest.raises(ChecksumMismatch) as failure:
        product.control.wait_restore(arn, name, timeout_s=90)
    message = str(failure.value)
    assert f"Seeding rt-tamper from s3://{product.bucket}/{key} failed" in message
    assert "ChecksumMismatch" in message and "sha256" in message  # the seed's own reason, from its progress part
    failed = product.control.catalog.get_cache(name)
    assert failed["Status"] == "failed" and failed["Nodes"] == []
    assert product.running_tasks(name) == []  # no node left behind
    assert product.control.describe_snapshot("tamper-snap")["SnapshotStatus"] == "available"


@pytest.mark.parametrize("shards", [2, 3, 4])
def test_three_shards_to_any_shard_count(
    product: Product, clustered: Source, targets: list[str], shards: int
) -> None:
    """3 -> 3 and 3 -> 2: each new primary's seed cuts its slots out of the sources whose
    recorded slots meet its own and the node loads them (restore.seed_cluster). 3 -> 4 would
    have the seeds read the sources twice over (restore.seeded.seed_reads): LoadShard cuts
    them once and streams each node its records through its seed (restore.cutter)."""
    target = f"rt-{shards}"
    output, seconds = _restore(product, targets, target, snapshot=clustered.snapshot, num_shards=shards, replicas=0)
    assert output["NumNodeGroups"] == shards and output["ClusterMode"] is True
    assert output["LoadSummary"]["KeysLoaded"] == clustered.keys
    assert output["Verification"]["Mismatches"] == []
    _check_restored(product, clustered, target, shards=shards, cluster=True)
    assert output["Seeded"] is True
    assert "replica" not in output["Verification"]["Compared"]  # --replicas 0: none to claim in sync
    if shards == 4:
        _check_cut_once(product, target, output, clustered.snapshot)
        return
    assert output["LoadSummary"]["BytesSent"] == 0  # each seed read S3 itself: nothing went over the network
    assert how_loaded(output) == "seeded: each node loaded the snapshot from S3 itself"
    # Nothing passed through LoadShard to sample: Verify says it compared the key counts only.
    assert output["Verification"]["SampledKeys"] == 0
    assert "DUMP" not in output["Verification"]["Compared"]
    plans = _seed_plans(product, target)
    # A seed reads only the sources its slots need: 3 -> 3 is one each; 3 -> 2 splits the middle shard.
    assert [len(p["Sources"]) for p in plans] == {3: [1, 1, 1], 2: [2, 2]}[shards]
    print(f"restore 3 -> {shards} shards (seeded): {seconds:.2f} s")


def _check_cut_once(product: Product, target: str, output: dict[str, Any], snapshot: str) -> None:
    """The seeds relayed one cutter's stream: none was given sources, all got the same token."""
    envs = _seed_envs(product, target)
    assert envs and all("SEED_CUT" not in env for env in envs)
    assert len({json.loads(env["SEED_RELAY"])["Token"] for env in envs}) == 1
    # LoadShard sent each seed its node's RDB: more than the keys' values, less than twice the sources.
    sent = output["LoadSummary"]["BytesSent"]
    size = sum(n for key, (_, n) in _s3_objects(product, snapshot).items() if key.endswith(".rdb"))
    assert output["Seeded"] is True and 0.5 * size < sent < 2 * size
    assert how_loaded(output) == "seeded: the snapshot read once, each node's slots streamed to its loader"
    # The cutter kept samples of what it sent; Verify compared them with DUMP on the nodes.
    verification = output["Verification"]
    assert verification["SampledKeys"] > 0 and verification["Mismatches"] == []
    assert "DUMP of sampled keys" in verification["Compared"]


def _seed_envs(product: Product, target: str) -> list[dict[str, str]]:
    """Each primary's seed environment (its RunTask overrides), in shard order."""
    ecs = client("ecs")
    cluster = os.environ["ECS_CLUSTER"]
    arns = [n["TaskArn"] for n in product.control.catalog.get_cache(target)["Nodes"] if n["Role"] == "primary"]
    envs = []
    tasks = ecs.describe_tasks(cluster=cluster, tasks=arns)["tasks"]
    for task in sorted(tasks, key=lambda t: arns.index(t["taskArn"])):
        (seed,) = [o for o in task["overrides"]["containerOverrides"] if o["name"] == "seed"]
        envs.append({e["name"]: e["value"] for e in seed["environment"]})
    return envs


def _seed_plans(product: Product, target: str) -> list[dict[str, Any]]:
    """What each primary's seed was given (its RunTask overrides), in shard order."""
    return [json.loads(env["SEED_CUT"]) for env in _seed_envs(product, target)]


def _inside_a_short_string(rdb: bytes, tmp_path: Path) -> int:
    """An offset inside the bytes of a short raw string value (not a length, not a boundary)."""
    path = tmp_path / "shard.rdb"
    path.write_bytes(rdb)
    with RdbFile(path) as reader:
        for item in reader.iter_raw():
            if type(item) is tuple:
                _, _, op, vstart, vend, *_ = item
                if op == 0 and 4 <= rdb[vstart] < 0x40 and vend == vstart + 1 + rdb[vstart]:
                    return int(vstart) + 2
    raise AssertionError("no short raw string value in the RDB")


def test_three_shards_to_two_through_restore_when_seeding_is_off(
    product: Product, clustered: Source, targets: list[str]
) -> None:
    with _seeding_off(product):
        output, _ = _restore(product, targets, "rt-2-unseeded", snapshot=clustered.snapshot, num_shards=2, replicas=0)
    assert output["Seeded"] is False
    assert output["LoadSummary"]["BytesSent"] > 0  # RESTORE commands, routed by slot
    _check_restored(product, clustered, "rt-2-unseeded", shards=2, cluster=True)


@pytest.fixture(scope="module")
def tampered(product: Product, clustered: Source, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A copy of the clustered snapshot with one shard's RDB changed (the shared one stays as it is)."""
    s3 = client("s3")
    product.control.copy_snapshot(clustered.snapshot, "rsc-tampered", wait=True, timeout_s=60)
    key = sorted(k for k in _s3_objects(product, "rsc-tampered") if k.endswith(".rdb"))[1]
    body = s3.get_object(Bucket=product.bucket, Key=key)["Body"].read()
    at = _inside_a_short_string(body, tmp_path_factory.mktemp("tamper"))  # still parses: only the digests can tell
    s3.put_object(Bucket=product.bucket, Key=key, Body=body[:at] + bytes([body[at] ^ 1]) + body[at + 1 :])
    return "rsc-tampered"


@pytest.mark.parametrize("shards", [2, 4])
def test_a_seeded_cluster_refuses_an_object_that_is_not_the_snapshot(
    product: Product, tampered: str, targets: list[str], shards: int
) -> None:
    """A changed RDB is never loaded whole: the seed cutting it (3 -> 2) or LoadShard cutting it
    for the seeds (3 -> 4) stops before the trailer, and the restore fails as a checksum mismatch;
    nothing is left running."""
    name = f"rt-tamper-{shards}"
    targets.append(name)
    arn, _ = product.control.restore(name, snapshot=tampered, num_shards=shards, replicas=0)
    with pytest.raises(ChecksumMismatch) as failure:
        product.control.wait_restore(arn, name, timeout_s=90)
    message = str(failure.value)
    assert "sha256" in message.lower()
    if shards == 2:
        assert f"Seeding {name} from " in message  # the seed's own reason
    failed = product.control.catalog.get_cache(name)
    assert failed["Status"] == "failed" and failed["Nodes"] == []
    assert product.running_tasks(name) == []


def test_cluster_disabled_to_three_shards(product: Product, standalone: Source, targets: list[str]) -> None:
    # One replica per shard (the default): loaded primaries first, replicas attached after.
    output, seconds = _restore(
        product, targets, "rt-up", snapshot=standalone.snapshot, num_shards=3, cluster_mode="enabled"
    )
    assert output["ClusterMode"] is True
    assert output["Seeded"] is True  # cut once by LoadShard: three seeds would each read the whole RDB
    _check_cut_once(product, "rt-up", output, standalone.snapshot)
    primaries = _check_restored(product, standalone, "rt-up", shards=3, cluster=True)
    assert output["Verification"]["ReplicasInSync"] == 3
    assert "every replica linked and in sync" in output["Verification"]["Compared"]
    record = product.control.catalog.get_cache("rt-up")
    assert record["ReplicasPerNodeGroup"] == 1
    for group, primary in enumerate(primaries, start=1):
        (replica,) = [
            n["Address"] for n in record["Nodes"] if n["Role"] == "replica" and n["NodeGroupId"] == f"{group:04d}"
        ]
        conn = connect(replica)
        try:
            info = conn.info("replication")
            assert info["master_link_status"] == "up" and info["master_port"] == host_port(primary)[1]
        finally:
            conn.close()
        assert cache_digest([host_port(replica)]) == cache_digest([host_port(primary)])
    # Each key sits on the primary that owns its slot: the cluster answers without MOVED.
    host, port = host_port(primaries[0])
    rc = redis.RedisCluster(host=host, port=port, socket_timeout=30)
    try:
        assert rc.get(b"s:11:3") == b"3000"
        assert rc.fcall("cvt_get", 1, b"s:11:3") == b"3000"
    finally:
        rc.close()
    print(f"restore cluster-disabled -> 3 shards: {seconds:.2f} s")


def test_three_shards_to_cluster_disabled_when_asked(
    product: Product, clustered: Source, targets: list[str]
) -> None:
    output, seconds = _restore(
        product,
        targets,
        "rt-down",
        snapshot=clustered.snapshot,
        cluster_mode="disabled",
        allow_cluster_mode_disable=True,
        replicas=0,
    )
    assert output["ClusterMode"] is False
    primaries = _check_restored(product, clustered, "rt-down", shards=1, cluster=False)
    conn = connect(primaries[0])
    try:
        assert conn.info("cluster")["cluster_enabled"] == 0
    finally:
        conn.close()
    print(f"restore 3 shards -> cluster-disabled: {seconds:.2f} s")


# ------------------------------------------------------------------------------ 3: --from-s3
def test_seed_from_an_rdb_redis_server_made(product: Product, new_cache: Any, targets: list[str]) -> None:
    cache = new_cache("ext", replicas=0)
    primary = cache["Endpoints"][0]
    _write_rich(product, cache, seed=33)
    conn = connect(primary)
    try:
        conn.save()
        data_dir = Path(conn.config_get("dir")["dir"]) / conn.config_get("dbfilename")["dbfilename"]
        digest, keys = conn.execute_command("DEBUG", "DIGEST"), conn.dbsize()
    finally:
        conn.close()
    # Not under imports/: objects there start an import (a restore) by themselves.
    client("s3").upload_file(str(data_dir), product.bucket, "external/dump.rdb")
    output, _ = _restore(product, targets, "rt-s3", s3_sources=[f"s3://{product.bucket}/external/dump.rdb"])
    assert output["Status"] == "available" and output["SnapshotName"] is None
    record = product.control.catalog.get_cache("rt-s3")
    assert record["Status"] == "available"
    target = connect(record["Endpoints"][0])
    try:
        assert target.dbsize() == keys
        assert target.execute_command("DEBUG", "DIGEST") == digest
    finally:
        target.close()


def test_s3_version_selector_is_honoured(product: Product, new_cache: Any, targets: list[str]) -> None:
    """``s3://bucket/key?versionId=V`` restores version V, not the latest; an unknown version is refused."""
    s3 = client("s3")
    bucket = "cv-versioned-rdbs"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    cache = new_cache("ver", replicas=0)
    conn = connect(cache["Endpoints"][0])
    versions = []
    try:
        for generation in (1, 2):
            conn.flushall()
            conn.mset({f"gen{generation}:{i}": i for i in range(50 * generation)})
            conn.save()
            dump = Path(conn.config_get("dir")["dir"]) / conn.config_get("dbfilename")["dbfilename"]
            with open(dump, "rb") as body:
                put = s3.put_object(Bucket=bucket, Key="dumps/cache.rdb", Body=body)
            versions.append((put["VersionId"], conn.execute_command("DEBUG", "DIGEST"), conn.dbsize()))
    finally:
        conn.close()
    (first, first_digest, first_keys), (_, latest_digest, _) = versions
    assert first_digest != latest_digest

    output, _ = _restore(product, targets, "rt-ver", s3_sources=[f"s3://{bucket}/dumps/cache.rdb?versionId={first}"])
    assert output["Status"] == "available"
    target = connect(product.control.catalog.get_cache("rt-ver")["Endpoints"][0])
    try:
        assert target.dbsize() == first_keys == 50
        assert target.execute_command("DEBUG", "DIGEST") == first_digest
    finally:
        target.close()

    with pytest.raises(InvalidS3Location, match=r"version no-such-version of s3://cv-versioned-rdbs/dumps/cache\.rdb"):
        product.control.restore("rt-ver-bad", s3_sources=[f"s3://{bucket}/dumps/cache.rdb?versionId=no-such-version"])
    assert product.control.catalog.find_cache("rt-ver-bad") is None


# ------------------------------------------------------------------------------ 4: failure mid-load
def _entered(product: Product, arn: str, state: str) -> bool:
    history = product.control.sfn.get_execution_history(executionArn=arn, maxResults=1000)["events"]
    return any(
        e.get("stateEnteredEventDetails", {}).get("name") == state
        for e in history
        if e["type"].endswith("StateEntered")
    )


def test_node_killed_during_load_fails_cleanly_and_a_retry_succeeds(
    product: Product, new_cache: Any, targets: list[str]
) -> None:
    cache = new_cache("big", replicas=0)
    primary = cache["Endpoints"][0]
    host, port = host_port(primary)
    datagen.generate(host, port, 24, seed=5)
    conn = connect(primary)
    try:
        digest = conn.execute_command("DEBUG", "DIGEST")
    finally:
        conn.close()
    product.control.create_snapshot(cache["CacheName"], "big-snap")
    product.control.wait_snapshot("big-snap", timeout_s=60)
    objects = _s3_objects(product, "big-snap")

    targets.append("rt-kill")
    with _seeding_off(product):  # a RESTORE load, routed by slot (a seeded node loads by itself)
        arn, name = product.control.restore("rt-kill", snapshot="big-snap", num_shards=2, replicas=0)
        record = wait_until(
            lambda: (c := product.control.catalog.find_cache(name)) and c.get("Nodes") and c,
            timeout=60,
            what="the target's nodes to be provisioned",
        )
    pids = product.node_pids(name)
    assert pids and all(process_alive(pid) for pid in pids)
    victim = next(n for n in record["Nodes"] if n["Role"] == "primary" and n["NodeGroupId"] == "0002")
    other = next(n for n in record["Nodes"] if n["Role"] == "primary" and n["NodeGroupId"] == "0001")
    # Hold the victim's writes so the load is certainly under way when the node dies.
    pause = connect(victim["Address"])
    try:
        pause.execute_command("CLIENT", "PAUSE", 20000, "WRITE")
    finally:
        pause.close()
    wait_until(lambda: _entered(product, arn, "LoadShard"), timeout=30, what="LoadShard to start")
    # Mid-load: the other primary already holds restored keys.
    wait_until(lambda: _keycount([other["Address"]]) > 0, timeout=30, what="keys on the other primary")
    # While a restore reads it the snapshot shows restoring; the half-loaded cache is not available.
    assert product.control.describe_snapshot("big-snap")["SnapshotStatus"] == "restoring"
    assert product.control.catalog.get_cache(name)["Status"] == "creating"
    (victim_pid,) = ecs.RUNNER.pids(victim["TaskArn"])
    product.kill_node(victim["CacheNodeId"])
    assert not process_alive(victim_pid)

    with pytest.raises(RestoreFailed) as failure:
        product.control.wait_restore(arn, name, timeout_s=60)
    assert failure.value.code == "RestoreFailed"
    assert victim["Address"] in str(failure.value)  # names the node that went away

    failed = product.control.catalog.get_cache(name)
    assert failed["Status"] == "failed"
    assert failed["FailureReason"].startswith("RestoreFailed: ")
    assert failed["Nodes"] == [] and failed["Endpoints"] == []
    assert not any(process_alive(pid) for pid in pids)  # every node of the target stopped
    assert not (product.settings.state_dir / "restore-staging" / name).exists()
    assert product.running_tasks(name) == []
    assert product.control.describe_snapshot("big-snap")["SnapshotStatus"] == "available"
    assert _s3_objects(product, "big-snap") == objects

    output, seconds = _restore(product, targets, "rt-kill", snapshot="big-snap", num_shards=2, replicas=0)
    assert output["Status"] == "available"
    record = product.control.catalog.get_cache(name)
    assert record["Status"] == "available" and "FailureReason" not in record
    digests = cache_digest([host_port(p) for p in record["Endpoints"]])
    assert combined_digest(digests) == combined_digest([digest])
    assert product.control.describe_snapshot("big-snap")["SnapshotStatus"] == "available"
    assert _s3_objects(product, "big-snap") == objects
    print(f"retry restore of a 24 MB dataset into 2 shards: {seconds:.2f} s")


def test_every_product_function_runs_with_every_lambda_restriction(product: Product) -> None:
    # No relaxation for template.yaml's functions: frozen, read-only, private /tmp, limits, no Redis.
    for function in product.env.deployed.functions.values():
        assert lambda_runtime.RUNTIME.semantics_for(function.name) == lambda_runtime.LambdaSemantics()


def test_a_timed_out_load_step_fails_the_restore_with_its_reason(
    product: Product, new_cache: Any, targets: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoadShard past its Timeout is killed as Lambda kills it; MarkFailed ends the restore, never stuck."""
    cache = new_cache("slow", replicas=0)
    fill(cache["Endpoints"][0], keys=500, seed=9)
    product.control.create_snapshot(cache["CacheName"], "slow-snap")
    product.control.wait_snapshot("slow-snap", timeout_s=60)
    load_shard = product.env.deployed.function_name("RestoreLoadShardFunction")
    lam = client("lambda")
    lam.update_function_configuration(FunctionName=load_shard, Timeout=2)
    real_invoke = lambda_runtime.RUNTIME.invoke
    paused: list[str] = []

    def targets_hold_writes(config: Any, event: Any) -> Any:
        # Its target holds every write: the RESTORE batch waits, the invocation runs into its Timeout.
        if config.function_name == load_shard and isinstance(event, dict) and event.get("Targets"):
            for target in event["Targets"]:
                conn = redis.Redis(host=target["Host"], port=int(target["Port"]), socket_timeout=10)
                try:
                    conn.execute_command("CLIENT", "PAUSE", 30000, "WRITE")
                finally:
                    conn.close()
                paused.append(f"{target['Host']}:{target['Port']}")
        return real_invoke(config, event)

    monkeypatch.setattr(lambda_runtime.RUNTIME, "invoke", targets_hold_writes)
    targets.append("slow-copy")
    try:
        # A RESTORE load (a seeded one has no batch to hold back, restore.seeded.seedable).
        with _seeding_off(product), pytest.raises(CacheVaultError) as failure:
            arn, name = product.control.restore("slow-copy", snapshot="slow-snap", num_shards=2, replicas=0)
            product.control.wait_restore(arn, name, timeout_s=120)
    finally:
        lam.update_function_configuration(FunctionName=load_shard, Timeout=900)
    assert paused, "LoadShard was never invoked"
    assert "Sandbox.Timedout" in f"{failure.value.code} {failure.value}"
    failed = product.control.catalog.get_cache(name)
    assert failed["Status"] == "failed"
    assert "timed out" in failed["FailureReason"]
    assert product.running_tasks(name) == []  # the target's node tasks were stopped
    assert product.control.describe_snapshot("slow-snap")["SnapshotStatus"] == "available"
