"""The RestoreSnapshot state machine's steps, one function per Task state.

Preflight stages every source RDB on local disk (streamed from S3, SHA-256 checked,
scanned once) so every later decision rests on the file itself: its RDB version, its
databases, its exact key counts. Nothing is written to any cache before the staged
files are known good. ProvisionCache starts the new cache, seeded from the RDB files
when the layout matches (redis-server loading at start-up is the fastest path);
otherwise it starts the primaries alone, LoadShard streams each file into them with
pre-packed RESTORE batches, routed by hash slot, and AttachReplicas then adds the
replicas, which full-sync from their loaded primary (a primary with replicas would
propagate every RESTORE to them while it loads: 6x slower with one replica).

What grows with the shard count stays out of the state payload (256 KB): the staged
sources and each load's detailed result (per-target counts, key samples for Verify) are
execution documents in S3 (``execution_store``); the state carries ``SourcesKey`` and,
per load, its ``ResultKey``.
"""

from __future__ import annotations

import base64
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from cachevault import caches, events, execution_store, names, storage, topology
from cachevault import credentials as creds_mod
from cachevault.aws import client
from cachevault.catalog import Catalog
from cachevault.dump_payload import restore_payload
from cachevault.errors import (
    InvalidParameterCombination,
    InvalidParameterValue,
    InvalidS3Location,
    InvalidSnapshotState,
    ReplicationGroupAlreadyExistsFault,
    ReplicationGroupNotFoundFault,
    RestoreFailed,
)
from cachevault.failures import caught_failure
from cachevault.handler import logger, metrics, record_duration
from cachevault.progress_report import RESTORE, PartProgress
from cachevault.rdb import RdbFile, RdbKey, scan_rdb
from cachevault.restore_load import RestoreEntry, TargetShard, load_rdb_file
from cachevault.settings import Settings
from cachevault.slots import even_split, format_slot_ranges, parse_slot_ranges
from cachevault.timeutil import iso
from cachevault.verify import verify_restore

SAMPLES_PER_SOURCE = 40
SAMPLE_MAX_PAYLOAD = 2048  # keep the state machine's payload small (256 KB limit)
LOAD_PROGRESS_EVERY = 20_000  # keys between progress reports (each is a cheap callback; writes are throttled)
DATA_TIERING_NODE_FAMILY = "r6gd"
MiB = 1 << 20
ATTACH_BASE_TIMEOUT_S = 60.0
ATTACH_MIN_MB_S = 10.0  # slowest full sync we wait for (RDB transfer + load on the replica)
REPLICA_SYNC_CHECK_S = 15.0  # Verify: a replica must be in sync within this


def _staging_dir(settings: Settings, target: str) -> Path:
    return settings.state_dir / "restore-staging" / target


def _local_engine() -> tuple[str, str, int]:
    """Engine of the nodes the local fleet starts (the restore target's engine)."""
    engine, version = caches.local_engine()
    return engine, version, topology.rdb_version_for(engine, version)


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
    _check_target_free(catalog, target)
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
        sources = [
            {
                "Bucket": bucket,
                "Key": n["S3Key"],
                "Sha256": n["Sha256"],
                "Size": n["CacheSize"],
                "Slots": n.get("Slots"),
            }
            for n in manifest["NodeSnapshots"]
        ]
        source_cluster = bool(manifest["ClusterMode"])
        source_node_type = manifest.get("CacheNodeType") or ""
        source_tiering = manifest.get("DataTiering") == "enabled"
    else:
        sources = [_s3_source(arn) for arn in arns]
        source_cluster = any(s["Slots"] for s in sources)
        source_node_type, source_tiering = "", False

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

    # Reserve the target name and mark the snapshot before the (long) staging read.
    catalog.register_cache(
        {
            "CacheName": target,
            "Status": "creating",
            "Managed": "local",
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

    staged = _stage_sources(settings, target, sources)
    engine, version, max_rdb = _local_engine()
    newest = max(s["RdbVersion"] for s in staged)
    if newest > max_rdb:
        raise InvalidParameterCombination(
            f"The snapshot's RDB version {newest} is newer than the target engine {engine} {version} "
            f"can load (RDB version {max_rdb} at most). Restore into a newer engine version."
        )
    dbs = sorted({int(db) for s in staged for db in s["KeysPerDb"]})
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
        "SourcesKey": execution_store.put(execution, "sources", staged, settings),
        "SourceCount": len(staged),
        "ExecutionName": execution,
    }


def restore_sources(event: dict[str, Any]) -> list[dict[str, Any]]:
    """The staged sources Preflight recorded for this execution (read from S3)."""
    return list(execution_store.get(event["SourcesKey"]))


def _check_target_free(catalog: Catalog, target: str) -> None:
    existing = catalog.find_cache(target)
    if existing is None:
        return
    if existing.get("Status") == "failed" and existing.get("Managed") == "local":
        # A failed earlier restore left only its record: a retry may take the name again.
        caches.delete_local_cache(target, catalog.settings)
        return
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


def _stage_sources(settings: Settings, target: str, sources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    staging = _staging_dir(settings, target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    staged = []
    s3 = client("s3")
    for index, source in enumerate(sources, start=1):
        path = staging / f"{index:04d}.rdb"
        report = PartProgress(
            Catalog(settings), RESTORE, target, f"download-{index:04d}", phase="download", total=source.get("Size")
        )
        report.start()
        got = storage.download_to_file(
            s3, source["Bucket"], source["Key"], path, expected_sha256=source["Sha256"], on_bytes=report.update,
            version_id=source.get("VersionId"),
        )
        report.finish(got["size"])
        summary = scan_rdb(path)
        if not summary.checksum_ok:
            raise InvalidParameterValue(f"{source['Key']}: the RDB's own CRC64 trailer does not match.")
        staged.append(
            {
                **source,
                "Path": str(path),
                "Index": index,
                "Slots": source["Slots"],
                "RdbVersion": summary.version,
                "KeysPerDb": {str(db): n for db, n in summary.keys_per_db.items()},
                "ExpiresPerDb": {str(db): n for db, n in summary.expires_per_db.items()},
                "KeyCount": summary.total_keys,
                "Functions": summary.functions,
                "ModuleKeysSkipped": summary.module_keys_skipped,
            }
        )
    return staged


# ---------------------------------------------------------------------------------- provision
def provision_step(event: dict[str, Any]) -> dict[str, Any]:
    settings = Settings.from_env()
    catalog = Catalog(settings)
    target, cluster_mode, shards = event["ReplicationGroupId"], event["ClusterMode"], event["NumNodeGroups"]
    sources = restore_sources(event)
    seeded = _can_seed(event, sources)
    fleet = caches._fleet(settings)
    cache = catalog.get_cache(target)
    creds = creds_mod.for_cache(cache)  # the target's AUTH/TLS, from its record, never the payload
    layout = fleet.create_cache(
        target,
        password=creds.password,
        username=creds.username,
        tls=creds_mod.fleet_tls(cache),
        cluster_mode=cluster_mode,
        num_shards=shards,
        # The network path loads the primaries alone; AttachReplicas adds the replicas after.
        replicas_per_shard=event["ReplicasPerNodeGroup"] if seeded else 0,
        seed_rdbs=[Path(s["Path"]) for s in sources] if seeded else None,
        detached=True,
    )
    _record_layout(catalog, layout, event, creds)
    targets = [
        {"Host": s.primary.host, "Port": s.primary.port, "Slots": s.slots} for s in layout.shards
    ]
    tasks = [] if seeded else [{"Index": s["Index"]} for s in sources]  # the rest is in SourcesKey
    logger.info("target provisioned", target=target, seeded=seeded, shards=len(targets))
    return {**event, "Seeded": seeded, "Targets": targets, "LoadTasks": tasks}


def _record_layout(catalog: Catalog, layout: Any, event: dict[str, Any], creds: creds_mod.Credentials) -> None:
    """The target's registry record (nodes, replicas, endpoints) from its layout; still ``creating``."""
    record = caches.registry_record(
        layout,
        node_type=event["CacheNodeType"],
        kind="node-based",
        data_tiering="r6gd" in event["CacheNodeType"],
        credentials=creds,
    )
    record["Status"] = "creating"
    catalog.update_cache(layout.name, **{k: v for k, v in record.items() if k != "CacheName"})


def _can_seed(event: dict[str, Any], sources: list[dict[str, Any]]) -> bool:
    """Seed from files when every target shard maps to exactly one source file."""
    if event["ClusterMode"] != event["SourceClusterMode"] or len(sources) != event["NumNodeGroups"]:
        return False
    if not event["ClusterMode"]:
        return True
    expected = [format_slot_ranges([r]) for r in even_split(len(sources))]
    return [s["Slots"] for s in sources] == expected


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


def load_shard_step(event: dict[str, Any]) -> dict[str, Any]:
    """Stream one staged RDB into the target primaries (routed by slot in cluster mode).

    The detailed result (per-target counts, key samples for Verify) goes to an execution
    document; the Map gathers only its key and the key count.
    """
    task = event["Task"]
    source = next(s for s in restore_sources(event) if s["Index"] == task["Index"])
    targets = _targets(event)
    samples: list[dict[str, Any]] = []

    def keep_sample(entry: RestoreEntry) -> None:
        if len(samples) < SAMPLES_PER_SOURCE and len(entry.payload) <= SAMPLE_MAX_PAYLOAD:
            samples.append(_sample(entry.db, entry.key, bytes(entry.payload), entry.expire_ms))

    total_keys = int(source["KeyCount"])
    report = PartProgress(
        Catalog(Settings.from_env()),
        RESTORE,
        event.get("ReplicationGroupId") or "",
        f"load-{int(task['Index']):04d}",
        phase="load",
        total=total_keys,
        unit="keys",
    )
    report.start()
    result = load_rdb_file(
        source["Path"],
        targets,
        cluster_mode=event["ClusterMode"],
        sample_every=max(1, total_keys // SAMPLES_PER_SOURCE),
        on_sample=keep_sample,
        progress=lambda seen, _expired: report.update(seen),
        progress_every=LOAD_PROGRESS_EVERY,
    )
    report.finish(result.keys_loaded + result.keys_expired_skipped)
    skipped = [{"Module": m.module_name, "Key": _text(m.key), "Offset": m.offset} for m in result.modules_skipped]
    for module in skipped:
        logger.warning("module value skipped", **module)
    metrics.add_metric(name="KeysRestored", unit="Count", value=result.keys_loaded)
    detail = {
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
    key = execution_store.put(event["ExecutionName"], f"load-{int(task['Index']):04d}", detail)
    return {"Index": task["Index"], "ResultKey": key, "KeysLoaded": result.keys_loaded}


def _load_details(event: dict[str, Any]) -> list[dict[str, Any]]:
    """Every LoadShard's detailed result, in source order."""
    loads = sorted(event.get("LoadResults") or [], key=lambda r: r["Index"])
    return [execution_store.get(r["ResultKey"]) for r in loads]


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
    """Add the replicas to the loaded primaries; return when every replica is in sync.

    A no-op for a seeded target (created with its replicas) or one without replicas.
    """
    wanted = int(event["ReplicasPerNodeGroup"])
    if event.get("Seeded") or wanted == 0:
        return event
    settings = Settings.from_env()
    catalog = Catalog(settings)
    target = event["ReplicationGroupId"]
    creds = creds_mod.for_cache(catalog.get_cache(target))
    fleet = caches._fleet(settings)
    # A full sync moves the whole dataset once more: bound the wait by its size.
    megabytes = sum(int(s["Size"]) for s in restore_sources(event)) / MiB
    timeout = max(fleet.ready_timeout, ATTACH_BASE_TIMEOUT_S + megabytes / ATTACH_MIN_MB_S)
    layout = fleet.add_replicas(target, wanted, username=creds.username, timeout=timeout)
    _record_layout(catalog, layout, event, creds)
    logger.info("replicas attached", target=target, replicas_per_shard=wanted, shards=len(layout.shards))
    return event


# ---------------------------------------------------------------------------------- verify
def verify_step(event: dict[str, Any]) -> dict[str, Any]:
    targets = _targets(event)
    loads: list[dict[str, Any]] = []
    if event["Seeded"]:
        sources = restore_sources(event)
        expected = [int(s["KeyCount"]) for s in sources]
        volatile = [sum(int(n) for n in s["ExpiresPerDb"].values()) for s in sources]
        samples = [e for s in sources for e in _file_samples(s["Path"])]
    else:
        loads = _load_details(event)
        expected = [sum(r["KeysPerTarget"][i] for r in loads) for i in range(len(targets))]
        volatile = [sum(r["KeysWithTtlPerTarget"][i] for r in loads) for i in range(len(targets))]
        samples = [
            RestoreEntry(
                s["Db"], base64.b64decode(s["Key"]), base64.b64decode(s["Payload"]), s.get("ExpireMs")
            )
            for r in loads
            for s in r["Samples"]
        ]
    report = verify_restore(
        targets,
        expected_keys_per_target=expected,
        keys_with_ttl_per_target=volatile,
        samples=samples,
    )
    report["KeysExpected"] = sum(expected)
    report["ReplicasInSync"] = _check_replicas(event["ReplicationGroupId"], report)
    logger.info("restore verified", target=event["ReplicationGroupId"], report=report)
    return {k: v for k, v in event.items() if k != "LoadResults"} | {
        "Verification": report,
        "LoadSummary": _load_summary(loads),
    }


def _check_replicas(target: str, report: dict[str, Any]) -> int:
    """Every replica's link up and its offset equal to its primary's (bounded wait); their count."""
    fleet = caches._fleet(Settings.from_env())
    report["Compared"] += "; every replica linked and in sync (replication offset equal to its primary's)"
    lagging: list[str] = fleet.replicas_lagging(target)
    deadline = time.monotonic() + REPLICA_SYNC_CHECK_S
    while lagging and time.monotonic() < deadline:
        time.sleep(0.1)
        lagging = fleet.replicas_lagging(target)
    if lagging:
        report["Mismatches"] = [{"Node": n, "Reason": "ReplicaNotInSync"} for n in lagging]
        raise RestoreFailed(f"Restore verification failed: replicas not in sync: {', '.join(lagging)}", **report)
    layout = fleet.get_cache(target)
    return sum(len(s.replicas) for s in layout.shards)


def _file_samples(path: str) -> list[RestoreEntry]:
    samples: list[RestoreEntry] = []
    with RdbFile(path) as rdb:
        for item in rdb:
            if isinstance(item, RdbKey):
                payload = restore_payload(item.type_byte, item.value, rdb.version)
                samples.append(RestoreEntry(item.db, bytes(item.key), payload, item.expire_ms))
                if len(samples) >= SAMPLES_PER_SOURCE:
                    break
    return samples


MODULE_KEYS_LISTED = 20  # the summary names this many skipped module keys and counts them all


def _load_summary(loads: list[dict[str, Any]]) -> dict[str, Any]:
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
    catalog.update_cache(target, Status="available", RestoreCompleteTime=iso())
    if event.get("SnapshotName"):
        catalog.update_snapshot(event["SnapshotName"], SnapshotStatus="available")
        catalog.update_cache(target, SnapshotRestoring=None)
    shutil.rmtree(_staging_dir(settings, target), ignore_errors=True)
    execution_store.delete_all(event.get("ExecutionName", ""), settings)
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
        "Seeded": event["Seeded"],
        "Verification": event["Verification"],
        "LoadSummary": event.get("LoadSummary"),
    }


def fail_step(event: dict[str, Any]) -> dict[str, Any]:
    """Undo what this execution made: stop the new cache's nodes, mark it failed, free the snapshot."""
    _, execution, request, reason = caught_failure(event)
    settings = Settings.from_env()
    catalog = Catalog(settings)
    target = str(request.get("ReplicationGroupId", "")).lower()
    cache = catalog.find_cache(target) if target else None
    ours = bool(cache and execution and cache.get("RestoreExecution") == execution)
    if ours:
        fleet = caches._fleet(settings)
        try:
            fleet.destroy_cache(target)
        except ReplicationGroupNotFoundFault:  # nothing was started yet
            logger.info("no nodes to stop", target=target)
        catalog.update_cache(target, Status="failed", FailureReason=reason, Endpoints=[], Nodes=[])
        if cache.get("SnapshotRestoring"):
            catalog.update_snapshot(cache["SnapshotRestoring"], SnapshotStatus="available")
        shutil.rmtree(_staging_dir(settings, target), ignore_errors=True)
        execution_store.delete_all(execution, settings)
        metrics.add_metric(name="RestoreFailures", unit="Count", value=1)
        events.restore_status(events.RESTORE_FAILED, target, Status="failed", FailureReason=reason)
    logger.error("restore failed", target=target, reason=reason, record_owned=ours)
    return {"ReplicationGroupId": target, "Status": "failed" if ours else None, "FailureReason": reason}
