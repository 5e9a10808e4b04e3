"""cachevault restore: a snapshot (or an RDB in S3) into a new cache, any shard count."""

from __future__ import annotations

import argparse
from typing import Any

from cachevault import service
from cachevault.cli import context
from cachevault.cli.output import ProgressLine, add_json_flag, emit
from cachevault.cli.snapshot_cmd import accept_timeout, add_wait_timeout_flag
from cachevault.errors import InvalidParameterCombination


def register(sub: Any) -> None:
    restore = sub.add_parser(
        "restore",
        help="restore a snapshot into a new cache",
        description="cachevault restore SNAPSHOT NEW_CACHE [options]\n"
        "cachevault restore --from-s3 s3://bucket/key.rdb NEW_CACHE [options]",
    )
    restore.add_argument("first", metavar="SNAPSHOT", help="the snapshot (with --from-s3: the new cache)")
    restore.add_argument("second", metavar="NEW_CACHE", nargs="?", default=None, help="the new cache's name")
    restore.add_argument(
        "--from-s3",
        action="append",
        default=None,
        metavar="S3_URL",
        help="seed from an RDB in S3 (s3://bucket/key or arn:aws:s3:::bucket/key); repeat per shard",
    )
    restore.add_argument("--shards", "--num-node-groups", type=int, default=None, dest="shards")
    restore.add_argument("--replicas", "--replicas-per-node-group", type=int, default=None, dest="replicas")
    restore.add_argument("--node-type", "--cache-node-type", default=None, dest="node_type")
    restore.add_argument("--cluster-mode", choices=["enabled", "disabled"], default=None)
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
    restore.add_argument("--wait", action="store_true", help="wait until the new cache is available")
    add_wait_timeout_flag(restore)
    add_json_flag(restore)
    restore.set_defaults(func=cmd_restore, operation="CreateReplicationGroup")


def cmd_restore(args: argparse.Namespace) -> int:
    if args.from_s3:
        if args.second is not None:
            raise InvalidParameterCombination("with --from-s3 give only NEW_CACHE")
        snapshot, target = None, args.first
    else:
        if args.second is None:
            raise InvalidParameterCombination("give SNAPSHOT and NEW_CACHE (or --from-s3 URL NEW_CACHE)")
        snapshot, target = args.first, args.second
    control = context.control_plane()
    follow = f"cachevault cache describe {target.lower()}"
    line = ProgressLine()
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
            on_tick=lambda: line.update(f"{target.lower()}: waiting for the restore's preflight to run"),
        )
    finally:
        line.done()
    if not args.wait:
        emit(
            args,
            {"ReplicationGroupId": target, "Status": "creating", "ExecutionArn": arn},
            f"restoring into {target} (creating); follow with: cachevault cache describe {target}",
        )
        return 0
    line = ProgressLine()
    try:
        result = control.wait_restore(
            arn, target, timeout_s=args.wait_timeout, progress=lambda c: line.update(f"{target}: {c.get('Status')}")
        )
    except service.StillRunning as err:
        return context.gave_up_waiting(err, "CreateReplicationGroup", follow)
    finally:
        line.done()
    emit(args, result, restore_summary(result))
    return 0


def restore_summary(result: dict[str, Any]) -> str:
    verification = result.get("Verification", {})
    how = "seeded from the RDB files" if result["Seeded"] else "loaded over the network"
    mode = "enabled" if result["ClusterMode"] else "disabled"
    lines = [
        f"{result['ReplicationGroupId']}: {result['Status']}  {result['NumNodeGroups']} shard(s), "
        f"cluster mode {mode}, {how}",
        f"  verified: {verification.get('Compared', '')}",
    ]
    for count in verification.get("KeyCounts", []):
        lines.append(f"    {count['Target']}: {count['Actual']} keys (expected {count['Expected']})")
    mismatches = len(verification.get("Mismatches", []))
    lines.append(f"    sampled keys compared: {verification.get('SampledKeys', 0)}, mismatches: {mismatches}")
    return "\n".join(lines)
