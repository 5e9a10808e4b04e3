"""cachevault restore: a snapshot (or an RDB in S3) into a new cache, any shard count."""

from __future__ import annotations

import argparse
from typing import Any

from cachevault.core.errors import InvalidParameterCombination
from cachevault.ops import control_plane as service

from cachevault_tools.cli import context, shapes
from cachevault_tools.cli.output import add_json_flag, emit
from cachevault_tools.cli.progress import ProgressView, restore_parts
from cachevault_tools.cli.snapshot_cmd import accept_timeout, add_wait_timeout_flag, waiting_note


def register(sub: Any) -> None:
    restore = sub.add_parser(
        "restore",
        help="restore a snapshot into a new cache",
        description="restore a snapshot, or RDB files in S3, into a NEW cache (any shard count)",
        usage="\n  cachevault restore SNAPSHOT NEW_CACHE [options]"
        "\n  cachevault restore --from-s3 s3://bucket/key.rdb NEW_CACHE [options]"
        "\n  cachevault restore --snapshot-name SNAPSHOT --replication-group-id NEW_CACHE [options]",
    )
    restore.add_argument("first", metavar="SNAPSHOT", nargs="?", help="the snapshot (with --from-s3: the new cache)")
    restore.add_argument("second", metavar="NEW_CACHE", nargs="?", default=None, help="the new cache's name")
    restore.add_argument("--snapshot-name", default=None, help="the snapshot (instead of SNAPSHOT)")
    restore.add_argument("--replication-group-id", default=None, help="the new cache's name (instead of NEW_CACHE)")
    restore.add_argument(
        "--from-s3",
        "--snapshot-arns",
        action="append",
        default=None,
        metavar="S3_URL",
        help="seed from an RDB in S3 (s3://bucket/key or arn:aws:s3:::bucket/key); repeat per shard",
    )
    restore.add_argument(
        "--shards",
        "--num-node-groups",
        type=int,
        default=None,
        dest="shards",
        help="shards of the new cache (default: the snapshot's)",
    )
    restore.add_argument(
        "--replicas",
        "--replicas-per-node-group",
        type=int,
        default=None,
        dest="replicas",
        help="replicas per shard, 0-5 (default: the snapshot's cache's)",
    )
    restore.add_argument(
        "--node-type",
        "--cache-node-type",
        default=None,
        dest="node_type",
        help="node type label, e.g. cache.r7g.large (default: the snapshot's)",
    )
    restore.add_argument(
        "--cluster-mode",
        choices=["enabled", "disabled"],
        default=None,
        help="cluster mode of the new cache (default: the snapshot's)",
    )
    restore.add_argument(
        "--allow-cluster-mode-disable",
        action="store_true",
        help="allow a cluster-mode-enabled snapshot into a cluster-mode-disabled cache",
    )
    restore.add_argument(
        "--auth-secret-arn",
        default=None,
        help="protect the new cache with these credentials (Secrets Manager, JSON username/password)",
    )
    restore.add_argument("--auth-parameter-name", default=None, help="...or an SSM SecureString parameter")
    restore.add_argument("--auth-username", default=None, help="ACL user for the credentials (default: default)")
    restore.add_argument("--wait", action="store_true", help="wait until the new cache is available, showing progress")
    add_wait_timeout_flag(restore)
    add_json_flag(restore)
    restore.set_defaults(func=cmd_restore, operation="CreateReplicationGroup")


def _names(args: argparse.Namespace) -> tuple[str | None, str]:
    """(snapshot or None, target) from the positional or the AWS CLI form."""
    positional = [a for a in (args.first, args.second) if a]
    if args.from_s3:
        if args.snapshot_name:
            raise InvalidParameterCombination("give --from-s3 or a snapshot, not both.")
        target = args.replication_group_id or (positional[0] if len(positional) == 1 else None)
        if not target or len(positional) > (0 if args.replication_group_id else 1):
            raise InvalidParameterCombination(
                "with --from-s3 give only NEW_CACHE: cachevault restore --from-s3 s3://bucket/key.rdb NEW_CACHE"
            )
        return None, target
    snapshot = args.snapshot_name or (positional.pop(0) if positional else None)
    target = args.replication_group_id or (positional.pop(0) if positional else None)
    if not snapshot or not target or positional:
        raise InvalidParameterCombination(
            "give SNAPSHOT and NEW_CACHE: cachevault restore SNAPSHOT NEW_CACHE "
            "(or --from-s3 s3://bucket/key.rdb NEW_CACHE)"
        )
    return snapshot, target


def cmd_restore(args: argparse.Namespace) -> int:
    snapshot, target = _names(args)
    control = context.control_plane()
    follow = f"cachevault cache describe {target.lower()}"
    try:
        arn, target = control.restore(
            target,
            snapshot=snapshot,
            s3_sources=args.from_s3,
            num_shards=args.shards,
            replicas=args.replicas,
            node_type=args.node_type,
            cluster_mode=args.cluster_mode,
            allow_cluster_mode_disable=args.allow_cluster_mode_disable,
            security={
                "AuthSecretArn": args.auth_secret_arn,
                "AuthParameterName": args.auth_parameter_name,
                "AuthUsername": args.auth_username,
            },
            accept_timeout_s=accept_timeout(args),
            on_tick=waiting_note(f"{target.lower()}: waiting for the restore's preflight to run"),
        )
    except service.StillRunning as err:
        return context.gave_up_waiting(err, "CreateReplicationGroup", follow)
    if not args.wait:
        # Not accepted yet (another operation holds the queue): the record does not exist yet.
        record = control.catalog.find_cache(target) or {"CacheName": target, "Status": "creating"}
        group = shapes.replication_group(record, shapes.ArnBuilder(control.stack))
        group[shapes.EXTRAS]["ExecutionArn"] = arn
        emit(
            args,
            {"ReplicationGroup": group},
            f"restoring into {target} (creating); follow with: cachevault cache describe {target}",
        )
        return 0
    view = ProgressView(target)
    try:
        result = control.wait_restore(
            arn,
            target,
            timeout_s=args.wait_timeout,
            progress=lambda c: view.show(c.get("Status"), restore_parts(c)),
        )
    except service.StillRunning as err:
        return context.gave_up_waiting(err, "CreateReplicationGroup", follow)
    finally:
        view.close()
    emit(args, {"ReplicationGroup": restored_group(control, result, arn)}, restore_summary(result))
    return 0


def restored_group(control: Any, result: dict[str, Any], arn: str) -> dict[str, Any]:
    """The new cache as CreateReplicationGroup/DescribeReplicationGroups shape it; the restore's report
    (verification, load summary) under ``CacheVault.Restore``."""
    from cachevault.catalog import caches

    record = caches.describe_cache(result["ReplicationGroupId"], control.settings)
    group = shapes.replication_group(record, shapes.ArnBuilder(control.stack))
    group[shapes.EXTRAS]["Restore"] = {**result, "ExecutionArn": arn}
    return group


def how_loaded(result: dict[str, Any]) -> str:
    """How the data reached the nodes, from CompleteRestore's output (README, Seeded clusters)."""
    if not result.get("Seeded"):
        return "loaded over the network (RESTORE)"
    if (result.get("LoadSummary") or {}).get("BytesSent"):
        return "seeded: the snapshot read once, each node's slots streamed to its loader"
    return "seeded: each node loaded the snapshot from S3 itself"


def restore_summary(result: dict[str, Any]) -> str:
    verification = result.get("Verification", {})
    mode = "enabled" if result["ClusterMode"] else "disabled"
    lines = [
        f"{result['ReplicationGroupId']}: {result['Status']}  {result['NumNodeGroups']} shard(s), "
        f"cluster mode {mode}, {how_loaded(result)}",
        f"  verified: {verification.get('Compared', '')}",
    ]
    for count in verification.get("KeyCounts", []):
        lines.append(f"    {count['Target']}: {count['Actual']} keys (expected {count['Expected']})")
    mismatches = len(verification.get("Mismatches", []))
    lines.append(f"    sampled keys compared: {verification.get('SampledKeys', 0)}, mismatches: {mismatches}")
    return "\n".join(lines)
