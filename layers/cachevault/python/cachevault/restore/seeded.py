"""Seeded restores, the steps' side: which restores are seeded and what each seed is given
(ProvisionCache), and LoadShard's part in them: waiting while the nodes load from their seeds,
or cutting the sources once for them (restore.cutter).

The seeds themselves are restore.seed (a standalone shard's: the RDB served as a full resync),
restore.seed_cluster (a cluster node's: its slots cut into a FIFO) and restore.seed_relay (a
cluster node's fed by LoadShard's cut). The state machine's steps are restore.steps.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

from cachevault.catalog.progress_report import RESTORE, PartProgress
from cachevault.catalog.records import Catalog
from cachevault.core.aws import client
from cachevault.core.errors import ChecksumMismatch, RestoreFailed
from cachevault.core.settings import Settings
from cachevault.nodes import credentials as creds_mod
from cachevault.nodes import restore_targets
from cachevault.nodes.slots import even_split, format_slot_ranges, parse_slot_ranges
from cachevault.rdb import cut as rdb_cut
from cachevault.rdb.dump_payload import restore_payload
from cachevault.restore import cutter, seed_cluster
from cachevault.restore.load import TargetShard
from cachevault.restore.seed import SOURCE_FIELDS, SeedFailed, progress_part, replication_id, seed_environment
from cachevault.restore.verify import SAMPLE_MAX_PAYLOAD, keyspace_keys, sample_record, samples_per_source

# Seeded restores (restore.seed): each node of a new standalone cache restored from one RDB
# loads it from its task's seed container, which serves it from S3 as a replication stream
# (no RESTORE, no Python pass over the keys). Measured (1 GB, one replica, 2 cores, make
# bench): see README, Benchmarks. RESTORE_SEED_NODES=false (template RestoreSeedNodes) turns seeding off.
RESTORE_SEED_NODES_ENV = "RESTORE_SEED_NODES"
# A seeded cluster's seeds cut the sources themselves only when they read them at most this many
# times over; past it LoadShard cuts them once (cut_once). Each seed parses every source its slots
# meet: 1 GB, ~1 M keys, 1 -> 3 shards on 2 cores (three full reads), make bench: 27.1 s with
# every seed cutting against 11.1 s through one LoadShard's RESTORE batches.
SEED_CLUSTER_MAX_READS = 1.5
SEED_PLAN_MAX_BYTES = 4096  # a seed's source list in its RunTask overrides (8 KiB with the rest): ~16 sources
# Pauses between looks at a seeded shard (each a Query, a DescribeTasks and INFO per node): from
# the first to the longest, which grows after the first minute (ECS throttles DescribeTasks).
_SEED_POLL_S = (0.02, 0.2, 2.0)
_SEED_POLL_FAST_S = 60.0


def _seed_pauses() -> Iterator[float]:
    """The pauses between looks at seeded nodes: growing by half from the first to the longest."""
    started = time.monotonic()
    pause = _SEED_POLL_S[0]
    while True:  # the caller's deadline ends it
        yield pause
        longest = _SEED_POLL_S[1] if time.monotonic() - started < _SEED_POLL_FAST_S else _SEED_POLL_S[2]
        pause = min(longest, pause * 1.5)


# ---------------------------------------------------------------------------------- provision
def seedable(event: dict[str, Any], sources: list[dict[str, Any]]) -> bool:
    """Whether a new cache's nodes load the sources themselves, from their tasks' seed containers:
    a standalone cache restored from one RDB (restore.seed), or a cluster (restore.seed_cluster;
    ``cut_once`` says whether the seeds cut or relay one cutter's cut).

    Everything else loads through RESTORE: several sources into a standalone cache, a snapshot
    whose module values the restore skips (the target's image has no module to load them), or
    seeding off.
    """
    if os.environ.get(RESTORE_SEED_NODES_ENV, "true").lower() in ("false", "0", "no"):
        return False
    if not event["ClusterMode"] and len(sources) != 1:
        return False
    # No module data: none in the RDB (a foreign RDB's scan lists the modules it met, keys or
    # aux), or none possible (the source node had no module loaded when captured).
    return all(
        s.get("Modules") == [] and not s.get("ModuleKeysSkipped") and s.get("Sha256") and s.get("Size")
        for s in sources
    )


def cut_once(sources: list[dict[str, Any]], shards: int) -> bool:
    """Whether a seeded cluster's sources are cut once, by LoadShard (restore.cutter), rather than
    by every node's seed: when the seeds would read them more than SEED_CLUSTER_MAX_READS times
    over (1 -> 3 shards reads the one RDB three times), or a seed's source list would not fit in
    RunTask's overrides (the plan, the server's command, the CA: 8 KiB)."""
    per_seed = _per_seed_sources(sources, shards)
    return _times_read(sources, per_seed) > SEED_CLUSTER_MAX_READS or _largest_plan(per_seed) > SEED_PLAN_MAX_BYTES


def seed_reads(sources: list[dict[str, Any]], shards: int) -> float:
    """How many times over a seeded cluster's seeds would read the sources (restore.seed_cluster):
    every seed reads each source its slots meet. 1 for the same layout, 4/3 for 3 -> 2 shards,
    2 for 3 -> 4 or 1 -> 2, 3 for 1 -> 3."""
    return _times_read(sources, _per_seed_sources(sources, shards))


def _per_seed_sources(sources: list[dict[str, Any]], shards: int) -> list[list[dict[str, Any]]]:
    """The sources each seed of ``shards`` even shards would read."""
    return [seed_sources(sources, format_slot_ranges([r])) for r in even_split(shards)]


def _times_read(sources: list[dict[str, Any]], per_seed: list[list[dict[str, Any]]]) -> float:
    total = sum(int(s["Size"]) for s in sources) or 1
    return sum(int(s["Size"]) for mine in per_seed for s in mine) / total


def _largest_plan(per_seed: list[list[dict[str, Any]]]) -> int:
    """Bytes of the longest source list a seed would get (restore.seed_cluster)."""
    return max(len(json.dumps([{k: s[k] for k in SOURCE_FIELDS if s.get(k) is not None} for s in mine]))
               for mine in per_seed)  # fmt: skip


def cluster_seed_environment(
    event: dict[str, Any], sources: list[dict[str, Any]], node: str, slots: str, creds: creds_mod.Credentials
) -> list[dict[str, str]]:
    """A cluster node's seed: the sources whose recorded slots meet the node's (all of them when
    a source recorded none), its slots, and the highest RDB version among them."""
    version = max(int(s["RdbVersion"]) for s in sources)
    return [
        *seed_environment(None, event["ReplicationGroupId"], node, event["ExecutionName"]),
        *seed_cluster.plan_environment(seed_sources(sources, slots), slots, version, creds.username, creds.password),
    ]


def seed_sources(sources: list[dict[str, Any]], slots: str) -> list[dict[str, Any]]:
    """The sources a node owning ``slots`` reads: those whose recorded slots meet them, and every
    source that recorded none (a cluster-mode-disabled shard holds every slot)."""
    owned = parse_slot_ranges(slots)

    def meets(source: dict[str, Any]) -> bool:
        theirs = parse_slot_ranges(str(source["Slots"]))
        return any(lo <= o_hi and o_lo <= hi for lo, hi in theirs for o_lo, o_hi in owned)

    return [s for s in sources if not s.get("Slots") or meets(s)]


# ---------------------------------------------------------------------------------- load
def load_shard(
    event: dict[str, Any], source: dict[str, Any], primary: TargetShard, max_wait_s: float
) -> tuple[dict[str, Any], int]:
    """Point every node of the seeded shard at its task's seed, wait while they load the RDB it
    serves, then promote the primary and let the replicas resync partially (restore.seed); the
    details Verify reads (restore.steps ``load_outputs``' shape) and the keys the primary holds.

    A seed that fails (a digest or size that is not the snapshot's, a broken connection) says
    why in its progress part; a task that stops says why in DescribeTasks. The counts Verify
    checks come from the source (exact when counted from the RDB) and the primary's keyspace;
    nothing samples values (there was no pass over the keys): the SHA-256 the seed checked and
    the CRC64 the server checked while loading stand for them.
    """
    settings = Settings.from_env()
    catalog = Catalog(settings)
    target = event["ReplicationGroupId"]
    cache = catalog.get_cache(target)
    creds = creds_mod.for_cache(cache)
    shard = restore_targets.nodes_from_record(cache).shards[0]
    nodes = [shard.primary, *shard.replicas]
    size = int(source["Size"])
    where = f"s3://{source['Bucket']}/{source['Key']}"
    report = PartProgress(catalog, RESTORE, target, f"load-{int(source['Index']):04d}", phase="load", total=size)
    report.start()
    started = time.monotonic()
    deadline = started + max_wait_s
    following: set[str] = set()
    pauses = _seed_pauses()
    while True:  # bounded by the deadline
        seeds = _seed_parts(catalog, event, nodes, where)
        for node in nodes:
            if node.node_id not in following and seeds[node.node_id].get("Port"):
                restore_targets.follow_seed(node, int(seeds[node.node_id]["Port"]), creds)
                following.add(node.node_id)
        report.update(int(seeds[shard.primary.node_id].get("Done") or 0))
        served = all(p.get("Status") == "done" for p in seeds.values())  # each node acknowledged its load
        if served and not any(restore_targets.seeded_node_busy(n, creds) for n in nodes):
            break
        if time.monotonic() > deadline:
            done = {n: p.get("Done") for n, p in seeds.items()}
            raise RestoreFailed(f"The nodes of {target} had not loaded {where} after {max_wait_s:.0f} s "
                                f"(bytes served per node: {done})", Source=where)  # fmt: skip
        time.sleep(next(pauses))
    # Every node loaded this stream (its seed's replication ID), not something else.
    wrong = {n.node_id: rid for n in nodes if (rid := restore_targets.node_replid(n, creds)) != replication_id(source)}
    if wrong:
        raise RestoreFailed(f"Nodes of {target} did not load {where} from their seeds: {wrong}", Source=where)
    restore_targets.promote_seeded_shard(shard, creds, timeout=max(1.0, deadline - time.monotonic()))
    seconds = time.monotonic() - started
    report.finish(size)
    loaded_keys = keyspace_keys(primary)
    if loaded_keys == 0 and int(source.get("KeyCount") or 0) > 0:
        raise RestoreFailed(f"{target} holds no key after loading {where}, which has {source['KeyCount']}.")
    exact = bool(source.get("KeyCountExact"))
    expected = int(source["KeyCount"]) if exact else loaded_keys
    volatile = sum(int(n) for n in (source.get("ExpiresPerDb") or {}).values())
    details = {
        "Index": source["Index"],
        "KeysPerTarget": [expected],
        "KeysWithTtlPerTarget": [volatile],
        # Nodes load as replicas, which keep keys whose TTL has passed; the promoted primary
        # expires them (and its replicas with it) as any primary does.
        "KeysExpiredSkipped": 0,
        "BytesSent": 0,
        "Seconds": round(seconds, 3),
        "FunctionLibraries": int(source.get("Functions") or 0),
        "ModuleKeysSkipped": [],
        "Samples": [],
        "Seeded": {"Nodes": len(nodes), "BytesPerNode": size, "KeyCountFrom": "snapshot" if exact else "server"},
    }
    return details, loaded_keys


def load_cluster(
    event: dict[str, Any],
    sources: list[dict[str, Any]],
    targets: list[TargetShard],
    relay_token: str | None,
    max_wait_s: float,
) -> tuple[dict[str, Any], int]:
    """Load a new cluster's primaries from their tasks' seeds; JoinSeededCluster wires them next
    (restore.steps ``attach_replicas_step``). The details Verify reads and the keys the primaries hold.

    Each seed cuts its node's slots out of the sources (restore.seed_cluster), or, given the
    ``relay_token`` ProvisionCache gave the seeds (``Task.Cutter``), LoadShard reads each source
    once and streams every record to the seed of the node that owns its slot, which relays it
    (restore.cutter, restore.seed_relay). The counts
    Verify checks are what each node was given; a source whose keys were not all accounted for
    (keys outside the slots its shard recorded) fails the load.
    """
    catalog = Catalog(Settings.from_env())
    target = event["ReplicationGroupId"]
    shards = restore_targets.nodes_from_record(catalog.get_cache(target)).shards
    primaries = [s.primary for s in shards]
    where = ", ".join(f"s3://{s['Bucket']}/{s['Key']}" for s in sources)
    cut_here = relay_token is not None
    if cut_here:  # the bytes read: each source once, or each seed's sources
        total = sum(int(s["Size"]) for s in sources)
    else:
        total = sum(int(s["Size"]) for shard in shards for s in seed_sources(sources, str(shard.slots)))
    report = PartProgress(catalog, RESTORE, target, f"load-{int(sources[0]['Index']):04d}", phase="load", total=total)
    report.start()
    started = time.monotonic()
    samples: list[dict[str, Any]] = []  # the seeds loaded what they read themselves: none to compare
    if cut_here:
        stats, samples = _cut_for_seeds(catalog, event, shards, sources, where, report, relay_token or "",
                                        started + max_wait_s)  # fmt: skip
        parts = [seed_cluster.cut_fields(sources, part) for part in stats]
        sent = sum(part.bytes_written for part in stats)  # over the network, as RESTORE batches count
    else:
        seeds = _await_seeds(catalog, event, primaries, where, report, started + max_wait_s)
        parts, sent = [seeds[n.node_id] for n in primaries], 0
    report.finish(total)
    seconds = time.monotonic() - started
    check_accounted(sources, parts)
    loaded_keys = sum(keyspace_keys(t) for t in targets)
    details = {
        "Index": sources[0]["Index"],
        "KeysPerTarget": [int(p["Keys"]) for p in parts],
        "KeysWithTtlPerTarget": [int(p["KeysWithTtl"]) for p in parts],
        "KeysExpiredSkipped": sum(int(p["KeysExpiredSkipped"]) for p in parts),
        "BytesSent": sent,
        "Seconds": round(seconds, 3),
        "FunctionLibraries": max(int(p["Functions"]) for p in parts),
        "ModuleKeysSkipped": [],
        "Samples": samples,
        "Seeded": {
            "Nodes": len(parts),
            "BytesPerNode": [int(p["BytesWritten"]) for p in parts],
            "KeyCountFrom": "cutter" if cut_here else "seeds",
        },
    }
    return details, loaded_keys


def _cut_for_seeds(
    catalog: Catalog,
    event: dict[str, Any],
    shards: list[restore_targets.ShardNodes],
    sources: list[dict[str, Any]],
    where: str,
    report: PartProgress,
    token: str,
    deadline: float,
) -> tuple[list[rdb_cut.CutStats], list[dict[str, Any]]]:
    """Each source read once, every record streamed to the seed of the node that owns its slot
    (restore.cutter); what each node was given, once every node loaded it, and samples of the
    records for Verify (as the RESTORE path keeps, restore.steps ``load_shard_step``)."""
    target = event["ReplicationGroupId"]
    primaries = [s.primary for s in shards]

    def listening() -> set[str]:
        return {n for n, part in _seed_parts(catalog, event, primaries, where).items() if part.get("Port")}

    openers = seed_cluster.source_openers(client("s3"), sources, report.update)
    route = rdb_cut.route_slots([parse_slot_ranges(str(s.slots)) for s in shards])
    version = max(int(s["RdbVersion"]) for s in sources)
    samples: list[dict[str, Any]] = []

    def keep_sample(db: int, key: bytes, type_byte: int, value: memoryview, expire_ms: int | None) -> None:
        if len(value) < SAMPLE_MAX_PAYLOAD:  # never copy a large value
            payload = restore_payload(type_byte, value, version)
            if len(payload) <= SAMPLE_MAX_PAYLOAD:
                samples.append(sample_record(db, key, payload, expire_ms))

    # Spread over each source by its own key count (a count of 0 or an estimate only shortens the spread).
    per_source = samples_per_source(len(sources))
    every = [int(s.get("KeyCount") or 0) // per_source for s in sources]
    sampling = rdb_cut.Sampling(keep_sample, every, per_source)
    try:
        links = cutter.connect([(n.node_id, n.host) for n in primaries], token, listening, deadline, _seed_pauses())
        stats = cutter.stream(links, openers, route, version, deadline, sampling=sampling)
        return stats, samples
    except (SeedFailed, OSError) as exc:
        _seed_parts(catalog, event, primaries, where)  # a seed's own reason, or its stopped task's, says more
        raise RestoreFailed(f"Loading {target} from {where} failed: {exc}", Source=where) from exc


def _seed_parts(
    catalog: Catalog, event: dict[str, Any], nodes: list[restore_targets.NodeTask], where: str
) -> dict[str, dict[str, Any]]:
    """Node -> its seed's progress part of this restore; raises with the reasons when a seed
    failed or a node's task stopped (DescribeTasks)."""
    target = event["ReplicationGroupId"]
    parts = catalog.operation_progress(RESTORE, target)
    seeds = {n.node_id: parts.get(progress_part(n.node_id), {}) for n in nodes}
    # A part an earlier restore into this name left (its seed outlived it) is not this one's.
    seeds = {n: p if p.get("Execution") == event["ExecutionName"] else {} for n, p in seeds.items()}
    errors = [p["Error"] for p in seeds.values() if p.get("Error")]
    problems = restore_targets.seeded_task_problems(nodes)
    if errors or problems:
        message = f"Seeding {target} from {where} failed: " + "; ".join([*dict.fromkeys(errors), *problems])
        # The object is not the snapshot (its digest or size): the fault the RESTORE path raises.
        mismatch = bool(errors) and all(e.startswith("ChecksumMismatch") for e in errors)
        raise (ChecksumMismatch if mismatch else RestoreFailed)(message, Source=where)
    return seeds


def check_accounted(sources: list[dict[str, Any]], parts: list[dict[str, Any]]) -> None:
    """Every key of every source went to some node (or expired): a seed reads only the sources
    whose recorded slots meet its own, so a key outside them (a slot being migrated when the
    snapshot was taken) would otherwise go unseen. Each seed that read a source counted all its
    keys and those of its own slots; the owned counts of its readers add up to the total."""
    owned: dict[str, int] = {}
    every: dict[str, int] = {}
    for part in parts:
        for key, mine, total in part.get("SourceKeys") or []:
            owned[key] = owned.get(key, 0) + int(mine)
            every[key] = int(total)
    for source in sources:
        key = seed_cluster.source_id(source)
        if owned.get(key, 0) != every.get(key, 0):
            raise RestoreFailed(
                f"{key} holds {every.get(key, 0)} keys, but only {owned.get(key, 0)} lie in the slots of the "
                f"nodes that read it (its shard recorded slots {source.get('Slots')}).",
                Source=key,
            )


def _await_seeds(
    catalog: Catalog,
    event: dict[str, Any],
    nodes: list[restore_targets.NodeTask],
    where: str,
    report: PartProgress,
    deadline: float,
) -> dict[str, dict[str, Any]]:
    """Each seed's progress part once all of them are done (restore.seed_cluster); raises with
    their reasons when one fails or its task stops."""
    target = event["ReplicationGroupId"]
    started, pauses = time.monotonic(), _seed_pauses()
    while True:  # bounded by the deadline
        seeds = _seed_parts(catalog, event, nodes, where)
        report.update(sum(int(p.get("Done") or 0) for p in seeds.values()))
        if all(p.get("Status") == "done" for p in seeds.values()):
            return seeds
        if time.monotonic() > deadline:
            done = {n: p.get("Done") for n, p in seeds.items()}
            raise RestoreFailed(f"The nodes of {target} had not loaded {where} after "
                                f"{deadline - started:.0f} s (bytes read per node: {done})", Source=where)  # fmt: skip
        time.sleep(next(pauses))
