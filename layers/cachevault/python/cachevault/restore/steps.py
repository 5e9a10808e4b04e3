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

A new standalone cache restored from one RDB is *seeded* instead (restore.seeded ``seedable``): ProvisionCache
starts every node of the shard with the source in its task's seed container (restore.seed);
LoadShard points each node at its seed, which serves the RDB from S3 as a master's full
resync that the node parses as it arrives (no RESTORE, no Python pass over the keys, no
disk), then promotes the primary, and the replicas, loaded from the same stream, resync with
it partially; AttachReplicas has nothing to do. A new cluster is seeded too: each primary loads
its slots through a FIFO its seed fills, cut by the seed itself (restore.seed_cluster) or, when
the seeds would read the sources several times over (restore.seeded ``cut_once``), by LoadShard in one pass
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
from cachevault.nodes.slots import format_slot_ranges, parse_slot_ranges
from cachevault.rdb.reader import scan_rdb
from cachevault.restore import seed_cluster, seed_relay, seeded
from cachevault.restore.load import LoadResult, RestoreEntry, TargetShard, load_rdb_file
from cachevault.restore.seed import seed_environment
from cachevault.restore.verify import SAMPLE_MAX_PAYLOAD, sample_record, samples_per_source, verify_restore

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

SEED_WAIT_INLINE_S = 840.0  # LoadShard as a Lambda (15 minutes at most) waits this long for a seeded shard
SEED_WAIT_JOB_S = 12 * 3600.0  # LoadShard as an ECS task
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
    is_seeded = event.get("TargetType") != "external" and seeded.seedable(event, sources)
    routed = is_seeded and cluster_mode and seeded.cut_once(sources, shards)
    if routed and cache.get("TransitEncryptionEnabled"):
        is_seeded = routed = False  # the cutter's stream to the seeds is plain TCP: RESTORE over TLS instead
    if event.get("TargetType") == "external":
        topo = topology.discover(topology.seed_endpoints(cache), credentials=creds)
        targets = [
            {"Host": s.primary.host, "Port": s.primary.port, "Slots": format_slot_ranges(s.slots) or None}
            for s in topo.shards
        ]
    elif is_seeded and cluster_mode:
        if routed:
            token = secrets.token_hex(24)  # the seeds take a stream only from who knows it
            _put_json(storage.restore_relay_key(target, event["ExecutionName"]), {"Token": token})

            def seed(node: str, slots: str) -> list[dict[str, str]]:
                return [*seed_environment(None, target, node, event["ExecutionName"]),
                        *seed_relay.relay_environment(token, creds.username, creds.password)]  # fmt: skip
        else:

            def seed(node: str, slots: str) -> list[dict[str, str]]:
                return seeded.cluster_seed_environment(event, sources, node, slots, creds)

        nodes = restore_targets.start_seeded_cluster(
            target, shards, seed, seed_cluster.node_arguments(), engine=str(event.get("Engine") or "redis"),
            creds=creds, tls=creds_mod.fleet_tls(cache),
        )  # fmt: skip
        _record_nodes(catalog, nodes, event, creds)
        targets = [{"Host": s.primary.host, "Port": s.primary.port, "Slots": s.slots} for s in nodes.shards]
    elif is_seeded:
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
    if is_seeded and cluster_mode:  # one LoadShard: it waits for all the seeds, or cuts for them
        whole = load_task({**sources[0], "Size": sum(int(s["Size"]) for s in sources)})
        tasks = [{"Index": whole["Index"], "Runner": whole["Runner"], "Cutter": routed}]
    if any(t["Runner"] == "ecs" for t in tasks):  # worker tasks read the targets from S3 (load_job)
        _put_json(storage.restore_targets_key(target, event["ExecutionName"]), targets)
    logger.info("target provisioned", target=target, kind=event.get("TargetType"), shards=len(targets),
                seeded=is_seeded)  # fmt: skip
    return {**event, "Targets": targets, "LoadTasks": tasks, "Seeded": is_seeded}


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
        sources = restore_sources(event)
        token = None  # the seeds cut for themselves, or ProvisionCache gave them this for the cutter
        if event["Task"].get("Cutter"):
            relay = storage.restore_relay_key(event["ReplicationGroupId"], event["ExecutionName"])
            token = str(_read_json(relay)["Token"])
        details, keys = seeded.load_cluster(event, sources, _targets(event), token, seed_wait_s)
        return _seeded_output(event, int(sources[0]["Index"]), details, keys)
    index = int(event["Task"]["Index"])
    sources = restore_sources(event)
    source = next(s for s in sources if int(s["Index"]) == index)
    if event.get("Seeded"):
        details, keys = seeded.load_shard(event, source, _targets(event)[0], seed_wait_s)
        return _seeded_output(event, index, details, keys)
    task = load_task(source)
    targets = _targets(event)
    samples: list[dict[str, Any]] = []
    per_source = samples_per_source(len(sources))  # each source's share of what Verify compares

    def keep_sample(entry: RestoreEntry) -> None:
        if len(samples) < per_source and len(entry.payload) <= SAMPLE_MAX_PAYLOAD:
            samples.append(sample_record(entry.db, entry.key, bytes(entry.payload), entry.expire_ms))

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
            sample_every=max(1, int(task.get("KeyCount") or 0) // per_source),
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


def _seeded_output(event: dict[str, Any], index: int, details: dict[str, Any], loaded_keys: int) -> dict[str, Any]:
    """A seeded load's details for Verify in S3 (``ResultKey``) and the step's small output."""
    metrics.add_metric(name="KeysRestored", unit="Count", value=loaded_keys)
    key = storage.restore_work_key(event["ReplicationGroupId"], event["ExecutionName"], index)
    output = {"Index": details["Index"], "KeysLoaded": loaded_keys, "ResultKey": key}
    _put_json(key, details | {"Output": output})
    logger.info("seeded load done", target=event["ReplicationGroupId"], seconds=details["Seconds"], keys=loaded_keys,
                seeded=details["Seeded"])  # fmt: skip
    return output


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
        "Seeded": bool(event.get("Seeded")),  # the nodes loaded the RDB themselves (restore.seeded ``seedable``)
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
