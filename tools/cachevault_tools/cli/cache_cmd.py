"""cachevault cache create|list|describe|delete: the cache registry and local caches."""

from __future__ import annotations

import argparse
from typing import Any

from cachevault.catalog import caches
from cachevault.nodes import credentials as creds_mod
from cachevault.ops import control_plane as service
from cachevault.ops import scheduler

from cachevault_tools.cli import context, shapes
from cachevault_tools.cli.output import add_json_flag, emit, name_argument, pick_name, table
from cachevault_tools.cli.progress import ProgressView, capture_parts


def register(sub: Any) -> None:
    cache = sub.add_parser("cache", help="create, list, describe and delete caches")
    verbs = cache.add_subparsers(dest="verb", required=True, metavar="VERB")

    create = verbs.add_parser("create", help="start a local cache of real redis-server nodes and register it")
    name_argument(create, "name", "--replication-group-id", "the cache's name (1-40 chars, letters, digits, hyphens)")
    create.add_argument(
        "--cluster-mode", choices=["enabled", "disabled"], default="disabled", help="cluster mode (default disabled)"
    )
    create.add_argument(
        "--num-node-groups",
        "--shards",
        type=int,
        default=None,
        dest="shards",
        help="shards (cluster mode enabled; default 3 there, 1 otherwise)",
    )
    create.add_argument(
        "--replicas-per-node-group", "--replicas", type=int, default=1, dest="replicas", help="replicas per shard, 0-5"
    )
    create.add_argument(
        "--cache-node-type",
        "--node-type",
        default=caches.DEFAULT_NODE_TYPE,
        dest="node_type",
        help=f"node type label (default {caches.DEFAULT_NODE_TYPE}; r6gd means data tiering)",
    )
    create.add_argument(
        "--kind", choices=list(caches.KINDS), default="node-based", help="ElastiCache deployment kind it stands for"
    )
    create.add_argument("--engine", choices=["redis", "valkey"], default="redis", help="image of the nodes (ECS tasks)")
    create.add_argument("--data-tiering", action="store_true", help="label the cache as data tiering (r6gd)")
    _backup_options(create)
    _security_options(create)
    create.add_argument(
        "--auth-password",
        default=None,
        help="start the nodes with this AUTH password, kept in Secrets Manager (cachevault/NAME/auth); "
        "'-' reads it from stdin",
    )
    create.add_argument("--tls-cert-file", default=None, help="local TLS-only nodes: server certificate (PEM)")
    create.add_argument("--tls-key-file", default=None, help="local TLS-only nodes: its private key (PEM)")
    add_json_flag(create)
    create.set_defaults(func=cmd_create, operation="CreateReplicationGroup")

    reg = verbs.add_parser("register", help="register your own Redis/Valkey (Managed: external) by its endpoints")
    name_argument(reg, "name", "--replication-group-id", "the cache's name (1-40 chars, letters, digits, hyphens)")
    reg.add_argument("--endpoint", action="append", required=True, help="host:port of a node (repeatable)")
    reg.add_argument("--cluster-mode", choices=["enabled", "disabled"], default=None, help="checked against the nodes")
    reg.add_argument(
        "--cache-node-type",
        "--node-type",
        default=caches.DEFAULT_NODE_TYPE,
        dest="node_type",
        help=f"node type label (default {caches.DEFAULT_NODE_TYPE})",
    )
    reg.add_argument(
        "--kind", choices=list(caches.KINDS), default="node-based", help="ElastiCache deployment kind it stands for"
    )
    reg.add_argument("--data-tiering", action="store_true", help="label the cache as data tiering (r6gd)")
    reg.add_argument("--auth-parameter-name", default=None, help="SSM SecureString holding the credentials")
    reg.add_argument("--transit-encryption", action="store_true", help="connect over TLS")
    _security_options(reg)
    add_json_flag(reg)
    reg.set_defaults(func=cmd_register, operation="CreateReplicationGroup")

    modify = verbs.add_parser("modify", help="change a cache's automatic backup settings")
    name_argument(modify, "name", "--replication-group-id", "the cache")
    _backup_options(modify)
    add_json_flag(modify)
    modify.set_defaults(func=cmd_modify, operation="ModifyReplicationGroup")

    lst = verbs.add_parser("list", help="every registered cache")
    add_json_flag(lst)
    lst.set_defaults(func=cmd_list, operation="DescribeReplicationGroups")

    describe = verbs.add_parser("describe", help="a cache with its live topology (shards, slots, replicas)")
    name_argument(describe, "name", "--replication-group-id", "the cache")
    add_json_flag(describe)
    describe.set_defaults(func=cmd_describe, operation="DescribeReplicationGroups")

    delete = verbs.add_parser("delete", help="stop a cache's nodes and remove it from the registry")
    name_argument(delete, "name", "--replication-group-id", "the cache")
    delete.add_argument(
        "--final-snapshot",
        "--final-snapshot-identifier",
        dest="final_snapshot",
        default=None,
        help="take this snapshot from the primary first; the cache is deleted only if it succeeds",
    )
    add_json_flag(delete)
    delete.set_defaults(func=cmd_delete, operation="DeleteReplicationGroup")


def _security_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--auth-secret-arn",
        default=None,
        help='Secrets Manager secret: {"username": ..., "password": ...} or a bare password',
    )
    parser.add_argument("--auth-username", default=None, help="ACL user name (when the secret names none)")
    parser.add_argument("--tls-ca-file", default=None, help="CA bundle (PEM) checking the nodes' certificates")


def _password(value: str | None) -> str | None:
    if value != "-":
        return value
    import sys

    return sys.stdin.readline().rstrip("\n") or None


def _backup_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--snapshot-retention-limit",
        dest="retention",
        default=None,
        help=f"days to keep automatic snapshots (0 = automatic backups off, at most {scheduler.RETENTION_MAX_DAYS})",
    )
    parser.add_argument(
        "--snapshot-window",
        dest="window",
        default=None,
        help="daily UTC window for the automatic snapshot, hh24:mi-hh24:mi, at least 60 minutes (e.g. 05:00-06:00)",
    )


def cmd_create(args: argparse.Namespace) -> int:
    control = context.control_plane()
    cluster = args.cluster_mode == "enabled"
    shards = args.shards if args.shards is not None else (3 if cluster else 1)  # --shards 0 is refused
    # Validated before any node starts: a bad window costs nothing.
    backups = scheduler.backup_fields(None, retention_limit=args.retention, window=args.window)
    record = caches.create_local_cache(
        pick_name(args, "name", "--replication-group-id"),
        cluster_mode=cluster,
        num_shards=shards,
        replicas=args.replicas,
        node_type=args.node_type,
        kind=args.kind,
        data_tiering=args.data_tiering,
        engine=args.engine,
        extra=backups,
        settings=control.settings,
        auth_secret_arn=args.auth_secret_arn,
        auth_password=_password(args.auth_password),
        auth_username=args.auth_username,
        tls=_local_tls(args),
    )
    described = caches.describe_cache(record["CacheName"], control.settings)
    emit(args, {"ReplicationGroup": _shape(control, described)}, _describe_text(described))
    return 0


def _local_tls(args: argparse.Namespace) -> dict[str, str] | None:
    files = {"cert_file": args.tls_cert_file, "key_file": args.tls_key_file, "ca_file": args.tls_ca_file}
    if not any(files.values()):
        return None
    if not all(files.values()):
        from cachevault.core.errors import InvalidParameterCombination

        raise InvalidParameterCombination("TLS nodes need --tls-cert-file, --tls-key-file and --tls-ca-file.")
    return files


def cmd_register(args: argparse.Namespace) -> int:
    control = context.control_plane()
    record = caches.register_external_cache(
        pick_name(args, "name", "--replication-group-id"),
        args.endpoint,
        auth_secret_arn=args.auth_secret_arn,
        auth_parameter_name=args.auth_parameter_name,
        auth_username=args.auth_username,
        transit_encryption=args.transit_encryption,
        # The file is read here; the registry and every step get its PEM text.
        tls_ca_bundle=creds_mod.read_ca_file(args.tls_ca_file) if args.tls_ca_file else None,
        cluster_mode=None if args.cluster_mode is None else args.cluster_mode == "enabled",
        node_type=args.node_type,
        kind=args.kind,
        data_tiering=args.data_tiering,
        settings=control.settings,
    )
    described = caches.describe_cache(record["CacheName"], control.settings)
    emit(args, {"ReplicationGroup": _shape(control, described)}, _describe_text(described))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    control = context.control_plane()
    rows = control.catalog.list_caches()
    human_rows = [{**r, "ClusterMode": shapes.cluster_mode(r.get("ClusterMode"))} for r in rows]
    emit(
        args,
        {"ReplicationGroups": [_shape(control, r) for r in rows]},
        table(
            human_rows,
            ["CacheName", "Status", "Engine", "EngineVersion", "ClusterMode", "NumNodeGroups", "CacheNodeType"],
        ),
    )
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    control = context.control_plane()
    record = caches.describe_cache(pick_name(args, "name", "--replication-group-id"), control.settings)
    emit(args, {"ReplicationGroups": [_shape(control, record)]}, _describe_text(record))
    return 0


def cmd_modify(args: argparse.Namespace) -> int:
    control = context.control_plane()
    record = scheduler.modify_backup_settings(
        control.catalog,
        pick_name(args, "name", "--replication-group-id"),
        retention_limit=args.retention,
        window=args.window,
    )
    retention = record.get("SnapshotRetentionLimit", 0)
    human = f"{record['CacheName']}: automatic backups " + (
        f"kept {retention} day(s), window {record.get('SnapshotWindow')} UTC" if retention else "off"
    )
    emit(args, {"ReplicationGroup": _shape(control, record)}, human)
    return 0


def _shape(control: Any, record: dict[str, Any]) -> dict[str, Any]:
    return shapes.replication_group(record, shapes.ArnBuilder(control.stack))


def cmd_delete(args: argparse.Namespace) -> int:
    control = context.control_plane()
    name = pick_name(args, "name", "--replication-group-id")
    view = ProgressView(f"final snapshot {args.final_snapshot}") if args.final_snapshot else None
    try:
        result = control.delete_cache(
            name,
            final_snapshot=args.final_snapshot,
            progress=(lambda r: view.show(r["SnapshotStatus"], capture_parts(r))) if view else None,
        )
    except service.StillRunning as err:  # the final snapshot outlasted the wait: the delete goes on
        return context.gave_up_waiting(err, "DeleteReplicationGroup", f"cachevault cache describe {name.lower()}")
    finally:
        if view:
            view.close()
    human = f"deleted {result['CacheName']}"
    if args.final_snapshot:
        final = result["FinalSnapshot"]
        human += f" after final snapshot {final['SnapshotName']} ({final['SnapshotStatus']})"
    group = {
        "ReplicationGroupId": result["CacheName"],
        "Status": "deleting",
        shapes.EXTRAS: {k: v for k, v in result.items() if k != "CacheName"},
    }
    emit(args, {"ReplicationGroup": group}, human)
    return 0


def _describe_text(cache: dict[str, Any]) -> str:
    lines = [
        f"{cache['CacheName']}: {cache.get('Status')}  {cache.get('Engine')} {cache.get('EngineVersion')}  "
        f"cluster mode {'enabled' if cache.get('ClusterMode') else 'disabled'}  {cache.get('CacheNodeType')}",
    ]
    if cache.get("SnapshotRetentionLimit"):
        days, window = cache["SnapshotRetentionLimit"], cache.get("SnapshotWindow")
        lines.append(f"  automatic backups: kept {days} day(s), window {window} UTC")
    for group in cache.get("NodeGroups", []):
        slots = f" slots {group['Slots']}" if group.get("Slots") else ""
        lines.append(f"  shard {group['NodeGroupId']}{slots}: primary {group['Primary']}")
        for replica in group["Replicas"]:
            state = "up" if replica["LinkUp"] else "DOWN"
            lines.append(f"    replica {replica['Address']} link {state} lag {replica['LagBytes']} B")
    if cache.get("TopologyError"):
        lines.append(f"  topology unavailable: {cache['TopologyError']}")
    return "\n".join(lines)
