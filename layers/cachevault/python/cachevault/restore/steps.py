"""The RestoreSnapshot state machine's steps, one function per Task state.

No two steps share a disk (on AWS each Lambda has its own /tmp): every step reads what
it needs from S3 itself and hands on only names, never paths. Preflight decides from the
manifest of a cachevault snapshot (RDB version, databases, key counts, slots); an RDB
not made by cachevault (SnapshotArns) is streamed from S3 once with ranged GETs and
scanned (version, databases, exact key counts, CRC64, SHA-256), nothing staged. Nothing
is written to any cache before that. The target is one of restore_targets': a new cache
of ECS tasks (``ecs``) or an empty cache the user runs, registered by endpoint
(``external``, checked reachable and empty at preflight, before anything is written).
ProvisionCache starts the new cache's primaries (or reads the external layout);
AttachReplicas adds the replicas while the primaries are still empty; each LoadShard reads
its own source from S3 (a stream of ranged GETs overlapping the load, SHA-256 checked) and
sends pre-packed RESTORE batches, routed by hash slot, which the primaries propagate to
their replicas as they load. Verify waits until every replica's offset equals its primary's.

A new standalone cache restored from one RDB is *seeded* instead (``seedable``): ProvisionCache
starts every node of the shard with the source in its task's seed container (restore.seed);
LoadShard points each node at its seed, which serves the RDB from S3 as a master's full
resync that the node parses as it arrives (no RESTORE, no Python pass over the keys, no
disk), then promotes the primary, and the replicas, loaded from the same stream, resync with
it partially; AttachReplicas has nothing to do. A new cluster is seeded too: each primary loads
its slots through a FIFO its seed fills, cut by the seed itself (restore.seed_cluster) or, when
the seeds would read the sources several times over (``cut_once``), by LoadShard in one pass
over each source, streamed to the seeds (restore.cutter, restore.seed_relay).
Measured (1 GB of small keys, one replica, 2 cores, the load from a local file): 11.0 s with
the replica following the load vs 14.7 s loading the primary alone and full-syncing after.

What grows with the shard count stays out of the state payload (256 KB at 500 shards,
tests/unit/test_state_limits.py): Preflight writes the checked sources to
``restores/<target>/<execution>/sources.json`` and the state carries its key
(``SourcesKey``); each LoadShards item is ``{Index, Runner}`` and the step reads its source
(``load_task``) from that document. A LoadShard leaves its per-target key counts, totals
and sample keys in ``load-NNNN.json`` beside it and returns only its key and key count;
Verify reads those, MarkAvailable/MarkFailed delete the whole prefix.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

from botocore.exceptions import ClientError

from cachevault.catalog import caches, events, storage
from cachevault.catalog.progress_report import RESTORE, PartProgress
from cachevault.catalog.records import Catalog
from cachevault.core import encryption, names
from cachevault.core.aws import client
from cachevault.core.errors import (
    ChecksumMismatch,
    InvalidParameterCombination,
    InvalidParameterValue,
    InvalidS3Location,
    InvalidSnapshotState,
    ReplicationGroupAlreadyExistsFault,
    RestoreFailed,
)
from cachevault.core.failures import caught_failure, cleanup
from cachevault.core.handler import logger, metrics, record_duration
from cachevault.core.settings import Settings
from cachevault.core.timeutil import iso
from cachevault.nodes import credentials as creds_mod
from cachevault.nodes import restore_targets, topology
from cachevault.nodes.slots import even_split, format_slot_ranges, parse_slot_ranges
from cachevault.rdb import cut as rdb_cut
from cachevault.rdb.dump_payload import restore_payload
from cachevault.rdb.reader import scan_rdb
from cachevault.restore import cutter, seed_cluster, seed_relay
from cachevault.restore.load import LoadResult, RestoreEntry, TargetShard, load_rdb_file
from cachevault.restore.seed import SOURCE_FIELDS, SeedFailed, progress_part, replication_id, seed_environment
from cachevault.restore.verify import keyspace_keys, verify_restore

SAMPLES_PER_SOURCE = 40
SAMPLE_MAX_PAYLOAD = 2048  # bytes of one sample's DUMP payload kept for Verify
MODULE_KEYS_LISTED = 20  # module values skipped: named in the state up to this many, then counted
MISMATCHES_LISTED = 20  # Verify's mismatches named in its report (and error), then counted
LOAD_PROGRESS_EVERY = 20_000  # keys between progress reports (each is a cheap callback; writes are throttled)
DATA_TIERING_NODE_FAMILY = "r6gd"
MiB = 1 << 20
REPLICA_STALL_S = 15.0  # Verify: a replica behind its primary must gain ground within this
REPLICA_CATCH_UP_MAX_S = 600.0  # Verify: and be in sync within this, gaining or not


# LoadShard reads its source as ranged GETs through the reader's window, fetched one range
# ahead, so the download overlaps the load. Measured (256 MB of small keys, embedded S3,
# 2 cores): 2.8-3.3 s streamed vs 3.4-4.2 s downloaded to /tmp first (the download alone 0.7-1.4 s).
# Largest source a LoadShard Lambda takes: 10 of its 15 minutes at 50 MiB/s (S3 GET and
# RESTORE into a node, measured locally at 150 MB/s); bigger ones are worker jobs.
LOAD_INLINE_MAX_BYTES_ENV = "LOAD_INLINE_MAX_BYTES"
LOAD_INLINE_MAX_BYTES = 600 * 50 * MiB

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
SEED_WAIT_INLINE_S = 840.0  # LoadShard as a Lambda (15 minutes at most) waits this long for a seeded shard
SEED_WAIT_JOB_S = 12 * 3600.0  # LoadShard as an ECS task
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


def _target_engine(external: dict[str, Any] | None, engine: str) -> tuple[str, str, int]:
    """(engine, version, highest RDB version) the target accepts: the external nodes', or the image's."""
    if external is not None:
        version = str(external.get("EngineVersion", ""))
        return str(external.get("Engine")), version, int(external.get("MaxRdbVersion") or 0)
    return restore_targets.image_engine(engine)


# ---------------------------------------------------------------------------------- preflight
def preflight_step(event: dict[str, Any]) -> dict[str, Any]:
    request = event.get("Request", event)
    execution = event.get("ExecutionName", "")
    settings = Settings.from_env()
    catalog = Catalog(settings)
    target = names.cache_name(request.get("ReplicationGroupId", ""))
    snapshot_name = request.get("SnapshotName")
    arns = request.get("SnapshotArns") or []
    if bool(snapshot_name) == bool(arns):
        raise InvalidParameterCombination("Give exactly one of SnapshotName or SnapshotArns.")
    external = _check_target_free(catalog, target)
    external_layout = restore_targets.check_external_empty(external) if external is not None else None
    security = creds_mod.security_fields(request)  # names of secrets only, checked before any write
    creds_mod.fleet_tls(security)

    snapshot: dict[str, Any] | None = None
    if snapshot_name:
        snapshot = catalog.get_snapshot(names.snapshot_name(snapshot_name, automatic=True))
        if snapshot["SnapshotStatus"] != "available":
            raise InvalidSnapshotState(
                f"Snapshot {snapshot['SnapshotName']!r} is {snapshot['SnapshotStatus']!r}; only an "
                "available snapshot can be restored."
            )
        bucket = snapshot.get("Bucket", settings.bucket)
        manifest = storage.read_manifest(client("s3"), bucket, snapshot["SnapshotName"])
        sources = [_manifest_source(bucket, n) for n in manifest["NodeSnapshots"]]
        source_cluster = bool(manifest["ClusterMode"])
        source_engine = str(manifest.get("Engine") or "redis")
        source_node_type = manifest.get("CacheNodeType") or ""
        source_tiering = manifest.get("DataTiering") == "enabled"
    else:
        sources = [_s3_source(arn) for arn in arns]
        source_cluster = any(s["Slots"] for s in sources)
        source_node_type, source_tiering = "", False
        source_engine = "redis"
    engine = str(request.get("Engine") or source_engine).lower()

    if external_layout is not None:  # the user's nodes decide the layout
        cluster_mode = external_layout.cluster_mode
        if cluster_mode != _target_cluster_mode(request, source_cluster, len(sources)) and (
            request.get("ClusterMode") is not None or (source_cluster and not cluster_mode)
        ):
            _target_cluster_mode({**request, "ClusterMode": "enabled" if cluster_mode else "disabled"},
                                 source_cluster, len(sources))  # fmt: skip
        num_shards = len(external_layout.shards)
        replicas = len(external_layout.shards[0].replicas)
    else:
        cluster_mode = _target_cluster_mode(request, source_cluster, len(sources))
        # Given values are checked as given: 0 shards is refused, never taken for "not given".
        asked_shards = request.get("NumNodeGroups")
        num_shards = asked_shards if asked_shards is not None else (len(sources) if cluster_mode else 1)
        replicas = request["ReplicasPerNodeGroup"] if request.get("ReplicasPerNodeGroup") is not None else 1
    asked_type = request.get("CacheNodeType")
    node_type = asked_type if asked_type is not None else (source_node_type or caches.DEFAULT_NODE_TYPE)
    caches.validate_shape(
        cluster_mode=cluster_mode, num_shards=num_shards, replicas=replicas, kind="node-based", node_type=node_type
    )
    _check_data_tiering(source_node_type, source_tiering, node_type)

    # Reserve the target name and mark the snapshot before the (long) read of a foreign RDB.
    if external is not None:
        catalog.update_cache(
            target, Status="restoring", RestoreExecution=execution, RestoreSource=snapshot_name or ",".join(arns)
        )
    else:
        catalog.register_cache(
            {
                "CacheName": target,
                "Status": "creating",
                "Managed": "ecs",
                "Engine": engine,
                "RestoreExecution": execution,
                "RestoreSource": snapshot_name or ",".join(arns),
                "CacheNodeType": node_type,
                **security,
            }
        )
    if snapshot is not None:
        catalog.update_snapshot(snapshot["SnapshotName"], expect_status="available", SnapshotStatus="restoring")
        # Remembered on the cache so only this restore hands the snapshot back.
        catalog.update_cache(target, SnapshotRestoring=snapshot["SnapshotName"])

    checked = [_checked_source(settings, target, index, source) for index, source in enumerate(sources, start=1)]
    engine, version, max_rdb = _target_engine(external, engine)
    newest = max(s["RdbVersion"] for s in checked)
    if newest > max_rdb:
        raise InvalidParameterCombination(
            f"The snapshot's RDB version {newest} is newer than the target engine {engine} {version} "
            f"can load (RDB version {max_rdb} at most). Restore into a newer engine version."
        )
    dbs = sorted({int(db) for s in checked for db in s["KeysPerDb"]})
    if cluster_mode and any(db != 0 for db in dbs):
        raise InvalidParameterCombination(
            "A snapshot holding several databases cannot be restored into a cluster-mode-enabled cache "
            f"(cluster mode only has database 0); the snapshot has keys in databases {dbs}."
        )
    return {
        "ReplicationGroupId": target,
        "SnapshotName": snapshot["SnapshotName"] if snapshot else None,
        "SourceClusterMode": source_cluster,
        "ClusterMode": cluster_mode,
        "NumNodeGroups": num_shards,
        "ReplicasPerNodeGroup": replicas,
        "CacheNodeType": node_type,
        "TargetType": "external" if external is not None else "ecs",
        "Engine": engine,
        "SourcesKey": _put_json(storage.restore_sources_key(target, execution), checked),
        "SourceCount": len(checked),
        "ExecutionName": execution,
    }


def restore_sources(event: dict[str, Any]) -> list[dict[str, Any]]:
    """The checked sources Preflight recorded for this execution (read from S3)."""
    key = str(event["SourcesKey"])
    if not key.startswith(storage.RESTORES_PREFIX):
        raise InvalidParameterValue(f"SourcesKey {key!r} is not a restore's sources document.")
    return list(_read_json(key))


def _check_target_free(catalog: Catalog, target: str) -> dict[str, Any] | None:
    """None for a new (ECS) cache; the record of a registered external cache to restore into."""
    existing = catalog.find_cache(target)
    if existing is None:
        return None
    if existing.get("Managed") == "external":
        restore_targets.check_external_available(existing)
        return existing
    if existing.get("Status") == "failed" and existing.get("Managed") in ("local", "ecs"):
        # A failed earlier restore left only its record: a retry may take the name again.
        caches.delete_local_cache(target, catalog.settings)
        return None
    raise ReplicationGroupAlreadyExistsFault(f"Replication group {target!r} already exists.")


def _target_cluster_mode(request: dict[str, Any], source_cluster: bool, sources: int) -> bool:
    wanted = request.get("ClusterMode")
    if wanted is None:
        shards = request.get("NumNodeGroups")
        return source_cluster or (isinstance(shards, int) and shards > 1)
    if wanted not in ("enabled", "disabled"):
        raise InvalidParameterValue(f"ClusterMode must be enabled or disabled, not {wanted!r}.")
    if wanted == "disabled" and source_cluster and not request.get("AllowClusterModeDisable"):
        raise InvalidParameterCombination(
            "The snapshot is of a cluster-mode-enabled cache; restoring it with cluster mode disabled "
            "merges every shard into one node. ElastiCache refuses this; ask for it explicitly with "
            "AllowClusterModeDisable (CLI: --allow-cluster-mode-disable)."
        )
    return wanted == "enabled"


def _check_data_tiering(source_node_type: str, source_tiering: bool, target_node_type: str) -> None:
    from_tiering = source_tiering or DATA_TIERING_NODE_FAMILY in source_node_type
    if from_tiering and DATA_TIERING_NODE_FAMILY not in target_node_type:
        raise InvalidParameterCombination(
            f"A snapshot of a data tiering cache ({source_node_type or 'r6gd'}) can only be restored "
            f"into a data tiering node type (cache.r6gd.*), not {target_node_type!r}."
        )


def _s3_source(arn: str) -> dict[str, Any]:
    """``s3://bucket/key`` or ElastiCache's ``arn:aws:s3:::bucket/key``, with an optional ``?versionId=``.

    A version selector is honoured (HeadObject and GetObject of that version); any other
    query is refused rather than dropped, so the object read is always the one named.
    """
    if arn.startswith("arn:aws:s3:::"):
        rest = arn.removeprefix("arn:aws:s3:::")
    elif arn.startswith("s3://"):
        rest = arn.removeprefix("s3://")
    else:
        raise InvalidS3Location(f"{arn!r} is not an S3 location (s3://bucket/key or arn:aws:s3:::bucket/key).")
    bucket, _, key = rest.partition("/")
    version_id = None
    if "?" in key:
        key, _, query = key.partition("?")
        fields = parse_qs(query, keep_blank_values=True)
        if set(fields) != {"versionId"} or len(fields["versionId"]) != 1 or not fields["versionId"][0]:
            raise InvalidS3Location(
                f"{arn!r}: the only query an S3 source may carry is one ?versionId=<id> (got ?{query})."
            )
        version_id = fields["versionId"][0]
    if not bucket or not key:
        raise InvalidS3Location(f"{arn!r} names no object.")
    storage.check_key(key)  # no "..", absolute or percent-encoded escapes
    version = {"VersionId": version_id} if version_id else {}
    try:
        head = client("s3").head_object(Bucket=bucket, Key=key, **version)
    except Exception as exc:
        what = f"version {version_id} of " if version_id else ""
        raise InvalidS3Location(f"No readable RDB at {what}s3://{bucket}/{key}: {exc}") from exc
    return {
        "Bucket": bucket,
        "Key": key,
        "VersionId": version_id,
        "Sha256": None,
        "Size": int(head["ContentLength"]),
        "Slots": None,
    }


def _reader(source: dict[str, Any], **kwargs: Any) -> storage.S3RangeReader:
    """Ranged GETs of a source (that version of it, when named), checked against its SHA-256 and size."""
    return storage.S3RangeReader(
        client("s3"),
        source["Bucket"],
        source["Key"],
        expected_sha256=source.get("Sha256"),
        size=source.get("Size"),
        version_id=source.get("VersionId"),
        **kwargs,
    )


def _manifest_source(bucket: str, node: dict[str, Any]) -> dict[str, Any]:
    """One shard of a cachevault snapshot, as its manifest describes it.

    ``KeyCountExact``: counted from the RDB itself (else from INFO keyspace when the capture
    started, so a cache taking writes may differ; Verify then counts from the RDB).
    """
    source: dict[str, Any] = {
        "Bucket": bucket,
        "Key": storage.check_key(node["S3Key"]),
        "Sha256": node["Sha256"],
        "Size": int(node["CacheSize"]),
        "Slots": node.get("Slots"),
    }
    if node.get("RdbVersion") is None or node.get("KeysPerDb") is None:
        return source  # a manifest from before these fields: _checked_source reads the RDB
    keys = {str(db): int(n) for db, n in node["KeysPerDb"].items() if int(n)}
    return source | {
        "RdbVersion": int(node["RdbVersion"]),
        "KeysPerDb": keys,
        "ExpiresPerDb": {str(db): int(n) for db, n in (node.get("ExpiresPerDb") or {}).items() if int(n)},
        "KeyCount": int(node.get("KeyCount") if node.get("KeyCount") is not None else sum(keys.values())),
        "KeyCountExact": bool(node.get("KeyCountExact")),
        "Functions": node.get("Functions"),
        "ModuleKeysSkipped": node.get("ModuleKeysSkipped"),
        "Modules": node.get("Modules"),
    }


def _checked_source(settings: Settings, target: str, index: int, source: dict[str, Any]) -> dict[str, Any]:
    """A source with what the restore decides on: from its manifest, else read from S3 once.

    The read streams the object with ranged GETs through the RDB reader (nothing written
    anywhere): RDB version, key counts, CRC64 trailer; the SHA-256 it computes pins the
    object, so every later read of it is checked against the same bytes.
    """
    if "RdbVersion" in source:
        return {**source, "Index": index}
    report = PartProgress(
        Catalog(settings), RESTORE, target, f"download-{index:04d}", phase="download", total=source.get("Size")
    )
    report.start()
    reader = _reader(source, on_bytes=report.update)
    summary = scan_rdb(reader)  # closes the reader
    report.finish(reader.size)
    if not summary.checksum_ok:
        raise InvalidParameterValue(f"{source['Key']}: the RDB's own CRC64 trailer does not match.")
    return {
        **source,
        "Index": index,
        "Sha256": reader.sha256,
        "RdbVersion": summary.version,
        "KeysPerDb": {str(db): n for db, n in summary.keys_per_db.items()},
        "ExpiresPerDb": {str(db): n for db, n in summary.expires_per_db.items()},
        "KeyCount": summary.total_keys,
        "KeyCountExact": True,
        "Functions": summary.functions,
        "ModuleKeysSkipped": summary.module_keys_skipped,
        "Modules": list(summary.modules_seen),
    }


# ---------------------------------------------------------------------------------- provision
def provision_step(event: dict[str, Any]) -> dict[str, Any]:
    """The primaries to load: a new ECS cache's (its replicas join in AttachReplicas, before the
    load; a seeded shard's start with it) or the external cache's, read from its nodes."""
    catalog = Catalog(Settings.from_env())
    target, cluster_mode, shards = event["ReplicationGroupId"], event["ClusterMode"], event["NumNodeGroups"]
    cache = catalog.get_cache(target)
    creds = creds_mod.for_cache(cache)  # the target's AUTH/TLS, from its record, never the payload
    sources = restore_sources(event)
    seeded = event.get("TargetType") != "external" and seedable(event, sources)
    routed = seeded and cluster_mode and cut_once(sources, shards)
    if routed and cache.get("TransitEncryptionEnabled"):
        seeded = routed = False  # the cutter's stream to the seeds is plain TCP: RESTORE over TLS instead
    if event.get("TargetType") == "external":
        topo = topology.discover(topology.seed_endpoints(cache), credentials=creds)
        targets = [
            {"Host": s.primary.host, "Port": s.primary.port, "Slots": format_slot_ranges(s.slots) or None}
            for s in topo.shards
        ]
    elif seeded and cluster_mode:
        if routed:
            token = secrets.token_hex(24)  # the seeds take a stream only from who knows it
            _put_json(storage.restore_relay_key(target, event["ExecutionName"]), {"Token": token})

            def seed(node: str, slots: str) -> list[dict[str, str]]:
                return [*seed_environment(None, target, node, event["ExecutionName"]),
                        *seed_relay.relay_environment(token, creds.username, creds.password)]  # fmt: skip
        else:

            def seed(node: str, slots: str) -> list[dict[str, str]]:
                return _cluster_seed_environment(event, sources, node, slots, creds)

        nodes = restore_targets.start_seeded_cluster(
            target, shards, seed, seed_cluster.node_arguments(), engine=str(event.get("Engine") or "redis"),
            creds=creds, tls=creds_mod.fleet_tls(cache),
        )  # fmt: skip
        _record_nodes(catalog, nodes, event, creds)
        targets = [{"Host": s.primary.host, "Port": s.primary.port, "Slots": s.slots} for s in nodes.shards]
    elif seeded:
        engine = str(event.get("Engine") or "redis")
        source = sources[0]
        shard = restore_targets.start_seeded_shard(
            target, 0, int(event["ReplicasPerNodeGroup"]),
            lambda node: seed_environment(source, target, node, event["ExecutionName"]),
            engine=engine, creds=creds, tls=creds_mod.fleet_tls(cache),
        )  # fmt: skip
        nodes = restore_targets.CacheNodes(target, False, [shard])
        _record_nodes(catalog, nodes, event, creds)
        targets = [{"Host": shard.primary.host, "Port": shard.primary.port, "Slots": None}]
    else:
        nodes = restore_targets.create_ecs_cache(
            target, engine=event.get("Engine") or "redis", cluster_mode=cluster_mode, num_shards=shards, replicas=0,
            creds=creds, tls=creds_mod.fleet_tls(cache), settle=False,
        )  # fmt: skip  (LoadShard waits for cluster_state:ok: restore_targets.wire)
        _record_nodes(catalog, nodes, event, creds)
        targets = [{"Host": s.primary.host, "Port": s.primary.port, "Slots": s.slots} for s in nodes.shards]
    # The Map's items stay small (Index, Runner): each LoadShard reads its source from SourcesKey.
    tasks = [{k: t[k] for k in ("Index", "Runner")} for t in map(load_task, sources)]
    if seeded and cluster_mode:  # one LoadShard: it waits for all the seeds, or cuts for them
        whole = load_task({**sources[0], "Size": sum(int(s["Size"]) for s in sources)})
        tasks = [{"Index": whole["Index"], "Runner": whole["Runner"], "Cutter": routed}]
    if any(t["Runner"] == "ecs" for t in tasks):  # worker tasks read the targets from S3 (load_job)
        _put_json(storage.restore_targets_key(target, event["ExecutionName"]), targets)
    logger.info("target provisioned", target=target, kind=event.get("TargetType"), shards=len(targets), seeded=seeded)
    return {**event, "Targets": targets, "LoadTasks": tasks, "Seeded": seeded}


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
    return (
        seed_reads(sources, shards) > SEED_CLUSTER_MAX_READS
        or _largest_seed_plan(sources, shards) > SEED_PLAN_MAX_BYTES
    )


def _largest_seed_plan(sources: list[dict[str, Any]], shards: int) -> int:
    """Bytes of the longest source list a seed of this layout would get (restore.seed_cluster)."""
    return max(
        len(json.dumps([{k: s[k] for k in SOURCE_FIELDS if s.get(k) is not None} for s in mine]))
        for mine in (_seed_sources(sources, format_slot_ranges([r])) for r in even_split(shards))
    )


def seed_reads(sources: list[dict[str, Any]], shards: int) -> float:
    """How many times over a seeded cluster's seeds would read the sources (restore.seed_cluster):
    every seed reads each source its slots meet. 1 for the same layout, 4/3 for 3 -> 2 shards,
    2 for 3 -> 4 or 1 -> 2, 3 for 1 -> 3."""
    total = sum(int(s["Size"]) for s in sources) or 1
    read = sum(int(s["Size"]) for r in even_split(shards) for s in _seed_sources(sources, format_slot_ranges([r])))
    return read / total


def _cluster_seed_environment(
    event: dict[str, Any], sources: list[dict[str, Any]], node: str, slots: str, creds: creds_mod.Credentials
) -> list[dict[str, str]]:
    """A cluster node's seed: the sources whose recorded slots meet the node's (all of them when
    a source recorded none), its slots, and the highest RDB version among them."""
    version = max(int(s["RdbVersion"]) for s in sources)
    return [
        *seed_environment(None, event["ReplicationGroupId"], node, event["ExecutionName"]),
        *seed_cluster.plan_environment(_seed_sources(sources, slots), slots, version, creds.username, creds.password),
    ]


def _seed_sources(sources: list[dict[str, Any]], slots: str) -> list[dict[str, Any]]:
    """The sources a node owning ``slots`` reads: those whose recorded slots meet them, and every
    source that recorded none (a cluster-mode-disabled shard holds every slot)."""
    owned = parse_slot_ranges(slots)

    def meets(source: dict[str, Any]) -> bool:
        theirs = parse_slot_ranges(str(source["Slots"]))
        return any(lo <= o_hi and o_lo <= hi for lo, hi in theirs for o_lo, o_hi in owned)

    return [s for s in sources if not s.get("Slots") or meets(s)]


def _record_nodes(
    catalog: Catalog, nodes: restore_targets.CacheNodes, event: dict[str, Any], creds: creds_mod.Credentials
) -> None:
    """The new cache's registry record (nodes, task ARNs, endpoints); still ``creating``."""
    record = restore_targets.ecs_record(
        nodes, creds, node_type=event["CacheNodeType"], data_tiering="r6gd" in event["CacheNodeType"]
    )
    record["Status"] = "creating"
    catalog.update_cache(nodes.name, **{k: v for k, v in record.items() if k != "CacheName"})


def load_task(source: dict[str, Any]) -> dict[str, Any]:
    """What one LoadShard needs to read its source from S3 (an item of the LoadShards Map).

    ``Runner``: ``inline`` (the LoadShard Lambda) when the source loads well inside a
    Lambda's 15 minutes, else ``ecs`` (``load_job`` in a worker task), as captures decide.
    """
    task = {k: source[k] for k in ("Index", "Bucket", "Key", "Sha256", "Size", "KeyCount")}
    if source.get("VersionId"):
        task["VersionId"] = source["VersionId"]
    limit = int(os.environ.get(LOAD_INLINE_MAX_BYTES_ENV) or LOAD_INLINE_MAX_BYTES)
    return task | {"Runner": "inline" if int(source["Size"]) <= limit else "ecs"}


# ---------------------------------------------------------------------------------- load
def _targets(event: dict[str, Any]) -> list[TargetShard]:
    # The target's AUTH/TLS from its registry record (the Map passes the name, never a secret).
    name = event.get("ReplicationGroupId")
    creds = creds_mod.for_cache_name(name) if name else creds_mod.NONE
    return [
        TargetShard(
            t["Host"],
            int(t["Port"]),
            parse_slot_ranges(t["Slots"]) if t["Slots"] else (),
            creds.username,
            creds.password,
            creds.tls,
        )
        for t in event["Targets"]
    ]


def load_shard_step(event: dict[str, Any], seed_wait_s: float = SEED_WAIT_INLINE_S) -> dict[str, Any]:
    """Read one source RDB from S3 and stream it into the target primaries (routed by slot);
    for a seeded restore, wait until the nodes have loaded it themselves.

    The per-target counts, totals and sample keys go to a small S3 object under the
    restore's prefix (``ResultKey``); the returned state holds only that key and the count.
    """
    if event.get("Seeded") and event["ClusterMode"]:
        return _seeded_cluster_load(event, seed_wait_s)
    index = int(event["Task"]["Index"])
    source = next(s for s in restore_sources(event) if int(s["Index"]) == index)
    if event.get("Seeded"):
        return _seeded_load(event, source, seed_wait_s)
    task = load_task(source)
    targets = _targets(event)
    samples: list[dict[str, Any]] = []

    def keep_sample(entry: RestoreEntry) -> None:
        if len(samples) < SAMPLES_PER_SOURCE and len(entry.payload) <= SAMPLE_MAX_PAYLOAD:
            samples.append(_sample(entry.db, entry.key, bytes(entry.payload), entry.expire_ms))

    report = PartProgress(
        Catalog(Settings.from_env()),
        RESTORE,
        event.get("ReplicationGroupId") or "",
        f"load-{int(task['Index']):04d}",
        phase="load",
        total=int(task.get("KeyCount") or 0),
        unit="keys",
    )
    report.start()
    with _opened_source(task) as source:
        if event["ClusterMode"]:
            # A new cluster may still be settling (ProvisionCache does not wait, see
            # restore_targets.wire): the wait overlaps this step's start and first GET.
            # Its nodes' settings are cachevault's to touch only when cachevault started them.
            ours = Catalog(Settings.from_env()).get_cache(event["ReplicationGroupId"]).get("Managed") == "ecs"
            restore_targets.wait_cluster_ok([(t.host, t.port) for t in targets], targets[0].credentials, ours=ours)
        result = load_rdb_file(
            source,
            targets,
            cluster_mode=event["ClusterMode"],
            sample_every=max(1, int(task.get("KeyCount") or 0) // SAMPLES_PER_SOURCE),
            on_sample=keep_sample,
            progress=lambda seen, _expired: report.update(seen),
            progress_every=LOAD_PROGRESS_EVERY,
        )
    report.finish(result.keys_loaded + result.keys_expired_skipped)
    details, output = load_outputs(task, result, samples)
    for module in details["ModuleKeysSkipped"][:MODULE_KEYS_LISTED]:
        logger.warning("module value skipped", **module)
    metrics.add_metric(name="KeysRestored", unit="Count", value=result.keys_loaded)
    key = storage.restore_work_key(event["ReplicationGroupId"], event["ExecutionName"], int(task["Index"]))
    output["ResultKey"] = key
    _put_json(key, details | {"Output": output})
    return output


def _seeded_load(event: dict[str, Any], source: dict[str, Any], max_wait_s: float) -> dict[str, Any]:
    """Point every node of the seeded shard at its task's seed, wait while they load the RDB it
    serves, then promote the primary and let the replicas resync partially (restore.seed).

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
    primary = _targets(event)[0]
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
    metrics.add_metric(name="KeysRestored", unit="Count", value=loaded_keys)
    key = storage.restore_work_key(target, event["ExecutionName"], int(source["Index"]))
    output = {"Index": source["Index"], "KeysLoaded": loaded_keys, "ResultKey": key}
    _put_json(key, details | {"Output": output})
    logger.info("seeded shard loaded", target=target, seconds=round(seconds, 3), keys=loaded_keys)
    return output


def _seeded_cluster_load(event: dict[str, Any], max_wait_s: float) -> dict[str, Any]:
    """Load a new cluster's primaries from their tasks' seeds; JoinSeededCluster wires them next
    (``attach_replicas_step``).

    Each seed cuts its node's slots out of the sources (restore.seed_cluster), or, for a
    ``Task.Cutter``, LoadShard reads each source once and streams every record to the seed of
    the node that owns its slot, which relays it (restore.cutter, restore.seed_relay). The counts
    Verify checks are what each node was given; a source whose keys were not all accounted for
    (keys outside the slots its shard recorded) fails the load.
    """
    catalog = Catalog(Settings.from_env())
    target = event["ReplicationGroupId"]
    shards = restore_targets.nodes_from_record(catalog.get_cache(target)).shards
    primaries = [s.primary for s in shards]
    sources = restore_sources(event)
    where = ", ".join(f"s3://{s['Bucket']}/{s['Key']}" for s in sources)
    cut_here = bool(event["Task"].get("Cutter"))
    if cut_here:  # the bytes read: each source once, or each seed's sources
        total = sum(int(s["Size"]) for s in sources)
    else:
        total = sum(int(s["Size"]) for shard in shards for s in _seed_sources(sources, str(shard.slots)))
    report = PartProgress(catalog, RESTORE, target, f"load-{int(sources[0]['Index']):04d}", phase="load", total=total)
    report.start()
    started = time.monotonic()
    samples: list[dict[str, Any]] = []  # the seeds loaded what they read themselves: none to compare
    if cut_here:
        stats, samples = _cut_for_seeds(catalog, event, shards, sources, where, report, started + max_wait_s)
        parts = [seed_cluster.cut_fields(sources, part) for part in stats]
        sent = sum(part.bytes_written for part in stats)  # over the network, as RESTORE batches count
    else:
        seeds = _await_seeds(catalog, event, primaries, where, report, started + max_wait_s)
        parts, sent = [seeds[n.node_id] for n in primaries], 0
    report.finish(total)
    seconds = time.monotonic() - started
    _check_accounted(sources, parts)
    loaded_keys = sum(keyspace_keys(t) for t in _targets(event))
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
    metrics.add_metric(name="KeysRestored", unit="Count", value=loaded_keys)
    key = storage.restore_work_key(target, event["ExecutionName"], int(sources[0]["Index"]))
    output = {"Index": sources[0]["Index"], "KeysLoaded": loaded_keys, "ResultKey": key}
    _put_json(key, details | {"Output": output})
    logger.info("seeded cluster loaded", target=target, seconds=round(seconds, 3), keys=loaded_keys, cut_here=cut_here)
    return output


def _cut_for_seeds(
    catalog: Catalog,
    event: dict[str, Any],
    shards: list[restore_targets.ShardNodes],
    sources: list[dict[str, Any]],
    where: str,
    report: PartProgress,
    deadline: float,
) -> tuple[list[rdb_cut.CutStats], list[dict[str, Any]]]:
    """Each source read once, every record streamed to the seed of the node that owns its slot
    (restore.cutter); what each node was given, once every node loaded it, and samples of the
    records for Verify (as the RESTORE path keeps, ``load_shard_step``)."""
    target = event["ReplicationGroupId"]
    primaries = [s.primary for s in shards]
    token = str(_read_json(storage.restore_relay_key(target, event["ExecutionName"]))["Token"])

    def listening() -> set[str]:
        return {n for n, part in _seed_parts(catalog, event, primaries, where).items() if part.get("Port")}

    openers = seed_cluster.source_openers(client("s3"), sources, report.update)
    route = rdb_cut.route_slots([parse_slot_ranges(str(s.slots)) for s in shards])
    version = max(int(s["RdbVersion"]) for s in sources)
    samples: list[dict[str, Any]] = []
    wanted = SAMPLES_PER_SOURCE * len(sources)

    def keep_sample(db: int, key: bytes, type_byte: int, value: memoryview, expire_ms: int | None) -> None:
        if len(samples) < wanted and len(value) < SAMPLE_MAX_PAYLOAD:  # never copy a large value
            payload = restore_payload(type_byte, value, version)
            if len(payload) <= SAMPLE_MAX_PAYLOAD:
                samples.append(_sample(db, key, payload, expire_ms))

    keys = sum(int(s.get("KeyCount") or 0) for s in sources)
    every = max(1, keys // wanted)
    try:
        links = cutter.connect([(n.node_id, n.host) for n in primaries], token, listening, deadline, _seed_pauses())
        stats = cutter.stream(links, openers, route, version, deadline, sample_every=every, on_sample=keep_sample)
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


def _check_accounted(sources: list[dict[str, Any]], parts: list[dict[str, Any]]) -> None:
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


def load_outputs(
    task: dict[str, Any], result: LoadResult, samples: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(details for Verify and the summary, kept in S3; the step's output, without its ResultKey yet).

    The output's size does not grow with the number of targets or skipped module values:
    the Map gathers 500 of them into one state, which must stay below 256 KB.
    """
    skipped = [{"Module": m.module_name, "Key": _text(m.key), "Offset": m.offset} for m in result.modules_skipped]
    details = {
        "Index": task["Index"],
        "KeysPerTarget": result.keys_per_target,
        "KeysWithTtlPerTarget": [t.keys_with_ttl for t in result.targets],
        "KeysExpiredSkipped": result.keys_expired_skipped,
        "BytesSent": result.bytes_sent,
        "Seconds": round(result.seconds, 3),
        "FunctionLibraries": result.function_libraries_loaded,
        "ModuleKeysSkipped": skipped,
        "Samples": samples,
    }
    return details, {"Index": task["Index"], "KeysLoaded": result.keys_loaded}


def load_job(event: dict[str, Any]) -> dict[str, Any]:
    """LoadShard as a worker job (an ECS task for a shard too big for a Lambda's 15 minutes).

    Same input as the Lambda step (an item of the LoadShards Map) but for ``Targets``, read
    from the object ProvisionCache wrote (the task's environment holds 8 KB). An ECS task
    returns no output to the state machine: the result is in S3 (``ResultKey``), and
    ``load_result_step`` (a Lambda after the task) hands it to the Map as the Lambda step would have.
    """
    if "Targets" not in event:
        key = storage.restore_targets_key(event["ReplicationGroupId"], event["ExecutionName"])
        event = {**event, "Targets": _read_json(key)}
    return load_shard_step(event, seed_wait_s=SEED_WAIT_JOB_S)


def load_result_step(event: dict[str, Any]) -> dict[str, Any]:
    """The output of a LoadShard that ran as a worker job, read from its result object."""
    index = int(event["Task"]["Index"])
    key = storage.restore_work_key(event["ReplicationGroupId"], event["ExecutionName"], index)
    try:
        return dict(_load_details(key)["Output"])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
            raise
        # runTask.sync ends when the task stops, whatever its exit code: no result means it failed.
        raise RestoreFailed(
            f"The load of source {index} ran as an ECS task that ended without a result ({key} is missing); "
            "its log says why."
        ) from None


@contextlib.contextmanager
def _opened_source(task: dict[str, Any]) -> Iterator[storage.S3RangeReader]:
    """The task's RDB as a stream of ranged GETs, SHA-256 checked on the fly.

    A mismatch fails the load at the last byte, before FUNCTION LOAD and before the result
    is recorded.
    """
    reader = _reader(task)
    logger.info("loading as a stream of ranged GETs", key=task["Key"], bytes=reader.size)
    with reader:
        yield reader


def _put_json(key: str, document: Any) -> str:
    """Write one of the restore's work objects (under its prefix); returns its key."""
    client("s3").put_object(
        Bucket=Settings.from_env().bucket,
        Key=key,
        Body=json.dumps(document, separators=(",", ":")).encode(),
        ContentType="application/json",
        **encryption.s3_args(),
    )
    return key


def _load_details(key: str) -> dict[str, Any]:
    return dict(_read_json(key))


def _read_json(key: str) -> Any:
    body = client("s3").get_object(Bucket=Settings.from_env().bucket, Key=storage.check_key(key))["Body"]
    with contextlib.closing(body):
        return json.loads(body.read())


def _sample(db: int, key: bytes, payload: bytes, expire_ms: int | None) -> dict[str, Any]:
    return {
        "Db": db,
        "Key": base64.b64encode(bytes(key)).decode(),
        "Payload": base64.b64encode(payload).decode(),
        "ExpireMs": expire_ms,
    }


def _text(key: bytes | None) -> str | None:
    return None if key is None else bytes(key).decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------------- attach replicas
def attach_replicas_step(event: dict[str, Any]) -> dict[str, Any]:
    """Add the replicas (ECS tasks) to the still empty primaries; return when every replica is linked.

    The sync of an empty primary is immediate; from then on the replicas follow the load
    through the replication stream, and Verify checks that they caught up. A no-op for an
    external target (its replicas are the user's and sync by themselves) or one without replicas.

    As JoinSeededCluster, after the load (``LoadResults`` in the state): a seeded cluster's
    primaries loaded themselves unwired (restore.seed_cluster); they get their slots and meet
    first, then the replicas join and take a full sync of the loaded data.
    """
    wanted = int(event["ReplicasPerNodeGroup"])
    joining = bool(event.get("Seeded") and event["ClusterMode"] and "LoadResults" in event)
    if event.get("TargetType") == "external" or (event.get("Seeded") and not joining) or not (wanted or joining):
        return event  # a seeded standalone shard's replicas started with it (restore_targets.start_seeded_shard)
    catalog = Catalog(Settings.from_env())
    target = event["ReplicationGroupId"]
    cache = catalog.get_cache(target)
    creds = creds_mod.for_cache(cache)
    if joining:
        restore_targets.finish_seeded_cluster(restore_targets.nodes_from_record(cache), creds)
        if not wanted:
            return event
    sync_timeout = REPLICA_CATCH_UP_MAX_S if joining else restore_targets.READY_TIMEOUT_S
    nodes = restore_targets.add_ecs_replicas(cache, wanted, creds, creds_mod.fleet_tls(cache), sync_timeout)
    _record_nodes(catalog, nodes, event, creds)
    logger.info("replicas attached", target=target, replicas_per_shard=wanted, shards=len(nodes.shards))
    return event


# ---------------------------------------------------------------------------------- verify
def verify_step(event: dict[str, Any]) -> dict[str, Any]:
    targets = _targets(event)
    loads = event.get("LoadResults") or []
    details = [_load_details(r["ResultKey"]) for r in sorted(loads, key=lambda r: int(r["Index"]))]
    expected = [sum(d["KeysPerTarget"][i] for d in details) for i in range(len(targets))]
    volatile = [sum(d["KeysWithTtlPerTarget"][i] for d in details) for i in range(len(targets))]
    samples = [
        RestoreEntry(s["Db"], base64.b64decode(s["Key"]), base64.b64decode(s["Payload"]), s.get("ExpireMs"))
        for d in details
        for s in d["Samples"]
    ]
    report = verify_restore(
        targets,
        expected_keys_per_target=expected,
        keys_with_ttl_per_target=volatile,
        samples=samples,
        raise_on_mismatch=False,
    )
    report["KeysExpected"] = sum(expected)
    if report["Mismatches"]:
        # The error (its report included) travels in the state: name a few, count the rest.
        mismatches = report["Mismatches"]
        report["MismatchCount"], report["Mismatches"] = len(mismatches), mismatches[:MISMATCHES_LISTED]
        raise RestoreFailed(
            f"Restore verification failed: {len(mismatches)} mismatch(es); first: {mismatches[0]}", **report
        )
    report["ReplicasInSync"] = _check_replicas(event["ReplicationGroupId"], report)
    logger.info("restore verified", target=event["ReplicationGroupId"], report=report)
    return {k: v for k, v in event.items() if k != "LoadResults"} | {
        "Verification": report,
        "LoadSummary": _load_summary(details),
    }


def _check_replicas(target: str, report: dict[str, Any]) -> int:
    """Every replica's link up and its offset equal to its primary's; their count.

    The replicas followed the load, so they may still be applying its last commands: wait while
    they gain ground, and give up only when none did for REPLICA_STALL_S.
    """
    cache = Catalog(Settings.from_env()).get_cache(target)
    creds = creds_mod.for_cache(cache)
    if cache.get("Managed") == "external":
        shards: list[Any] = topology.discover(topology.seed_endpoints(cache), credentials=creds).shards
    else:
        shards = restore_targets.nodes_from_record(cache).shards
    if any(s.replicas for s in shards):  # a cache without replicas has none to compare
        report["Compared"] += "; every replica linked and in sync (replication offset equal to its primary's)"

    def lagging() -> dict[str, int | None]:
        return {n: lag for shard in shards for n, lag in restore_targets.replica_lag(shard, creds).items() if lag != 0}

    behind = until_caught_up(lagging)
    if behind:
        report["Mismatches"] = [{"Node": n, "Reason": "ReplicaNotInSync"} for n in behind]
        raise RestoreFailed(f"Restore verification failed: replicas not in sync: {', '.join(behind)}", **report)
    return sum(len(s.replicas) for s in shards)


def until_caught_up(
    lagging: Callable[[], dict[str, int | None]],
    stall_s: float = REPLICA_STALL_S,
    max_s: float = REPLICA_CATCH_UP_MAX_S,
    poll_s: float = 0.1,
) -> dict[str, int | None]:
    """Poll ``lagging`` (replica -> bytes behind, None: link down) until it is empty; what still
    lags when no replica gained ground for ``stall_s``, or after ``max_s`` in all."""
    started = time.monotonic()
    behind = lagging()
    gained_at = started
    while behind and time.monotonic() - gained_at < stall_s and time.monotonic() - started < max_s:
        time.sleep(poll_s)
        before, behind = behind, lagging()
        if any(lag is not None and (before.get(n) is None or lag < before[n]) for n, lag in behind.items()):
            gained_at = time.monotonic()  # still catching up
    return behind


def _load_summary(loads: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of the LoadShards' detailed results (their S3 objects); the first module values skipped, named."""
    skipped = [m for r in loads for m in r["ModuleKeysSkipped"]]
    return {
        "KeysLoaded": sum(sum(r["KeysPerTarget"]) for r in loads),
        "KeysExpiredSkipped": sum(r["KeysExpiredSkipped"] for r in loads),
        "BytesSent": sum(r["BytesSent"] for r in loads),
        "FunctionLibraries": max((r["FunctionLibraries"] for r in loads), default=0),
        "ModuleKeysSkippedCount": len(skipped),
        "ModuleKeysSkipped": skipped[:MODULE_KEYS_LISTED],
    }


# ---------------------------------------------------------------------------------- finish
def complete_step(event: dict[str, Any]) -> dict[str, Any]:
    settings = Settings.from_env()
    catalog = Catalog(settings)
    target = event["ReplicationGroupId"]
    cache = catalog.get_cache(target)
    retried = cache.get("Status") == "available" and cache.get("RestoreExecution") == event.get("ExecutionName")
    if not retried:
        # Conditional: a restore ended meanwhile (MarkFailed, or `cachevault recover` after its
        # execution was stopped) stays failed; this late step must not make it available.
        expected = "restoring" if event.get("TargetType") == "external" else "creating"
        catalog.update_cache(target, expect_status=expected, Status="available", RestoreCompleteTime=iso())
    if event.get("SnapshotName"):
        with contextlib.suppress(InvalidSnapshotState):  # handed back already (a retry, a recovery)
            catalog.update_snapshot(event["SnapshotName"], expect_status="restoring", SnapshotStatus="available")
        catalog.update_cache(target, SnapshotRestoring=None)
    _delete_work_objects(settings, target, event.get("ExecutionName"), [])
    catalog.delete_operation_progress(RESTORE, target)  # the CLI reads it only while the target is creating
    metrics.add_metric(name="RestoresCompleted", unit="Count", value=1)
    # Request to available: the target's record is made by the restore's preflight.
    record_duration("RestoreDuration", (catalog.find_cache(target) or {}).get("CacheCreateTime"))
    events.restore_status(events.RESTORE_COMPLETED, target, Status="available", SnapshotName=event.get("SnapshotName"))
    return {
        "ReplicationGroupId": target,
        "Status": "available",
        "SnapshotName": event.get("SnapshotName"),
        "ClusterMode": event["ClusterMode"],
        "NumNodeGroups": event["NumNodeGroups"],
        "Seeded": bool(event.get("Seeded")),  # the nodes loaded the RDB themselves (seedable)
        "Verification": event["Verification"],
        "LoadSummary": event.get("LoadSummary"),
    }


def fail_step(event: dict[str, Any]) -> dict[str, Any]:
    """Undo what this execution made: stop the new cache's nodes, mark it failed, free the snapshot.

    Never raises for what is already gone (nodes, the cache or snapshot record, the work
    objects in S3); any other cleanup error is reported in ``CleanupErrors`` after every
    other cleanup ran, so the snapshot is handed back to ``available`` whatever happened.
    """
    _, execution, request, reason = caught_failure(event)
    settings = Settings.from_env()
    catalog = Catalog(settings)
    errors: list[str] = []
    target = str(request.get("ReplicationGroupId", "")).lower()
    cache = cleanup("read the cache record", lambda: catalog.find_cache(target), errors) if target else None
    ours = bool(cache and execution and cache.get("RestoreExecution") == execution)
    if ours and cache is not None and cache.get("Managed") == "external":
        # The user's nodes stay theirs (possibly partly loaded, said in the reason); usable again.
        cleanup(
            "hand the external cache back",
            lambda: catalog.update_cache(target, Status="available", RestoreExecution=None, LastRestoreFailure=reason),
            errors,
        )
    elif ours and cache is not None:
        record = cache
        cleanup(
            "stop the new cache's tasks",
            lambda: restore_targets.destroy(record, f"restore into {target} failed"),
            errors,
        )
        cleanup(
            "mark the cache failed",
            lambda: catalog.update_cache(target, Status="failed", FailureReason=reason, Endpoints=[], Nodes=[]),
            errors,
        )
    if ours:
        assert cache is not None
        if cache.get("SnapshotRestoring"):
            name = cache["SnapshotRestoring"]
            cleanup("hand the snapshot back", lambda: catalog.update_snapshot(name, SnapshotStatus="available"), errors)
        _delete_work_objects(settings, target, execution, errors)
        cleanup("delete the load progress", lambda: catalog.delete_operation_progress(RESTORE, target), errors)
        metrics.add_metric(name="RestoreFailures", unit="Count", value=1)
        cleanup(
            "publish the failure event",
            lambda: events.restore_status(events.RESTORE_FAILED, target, Status="failed", FailureReason=reason),
            errors,
        )
    logger.error("restore failed", target=target, reason=reason, record_owned=ours, cleanup_errors=errors)
    return {
        "ReplicationGroupId": target,
        "Status": "failed" if ours else None,
        "FailureReason": reason,
        **({"CleanupErrors": errors} if errors else {}),
    }


def _delete_work_objects(settings: Settings, target: str, execution: str | None, errors: list[str]) -> None:
    """The LoadShard result objects of this execution (gone already is fine)."""
    if not execution:
        return
    prefix = storage.restore_prefix(target, execution)
    s3 = client("s3")
    cleanup("delete the restore's work objects", lambda: storage.delete_prefix(s3, settings.bucket, prefix), errors)
