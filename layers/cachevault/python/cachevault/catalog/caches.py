"""The cache registry: caches cachevault can snapshot and restore into.

A cache is either one cachevault made as ECS tasks running the Redis/Valkey image
(``Managed: ecs``, see restore_targets; locally the embedded ECS runs them as processes)
or a user's own Redis/Valkey registered by its endpoints (``Managed: external``). Either way
the catalog record carries what preflight needs: engine, version, cluster mode, node type
label, data tiering, kind, endpoints, nodes.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from cachevault.catalog.records import Catalog
from cachevault.core import names, node_types
from cachevault.core.aws import client
from cachevault.core.errors import (
    InvalidParameterCombination,
    InvalidParameterValue,
    InvalidReplicationGroupState,
    InvalidSnapshotState,
    NodeQuotaForClusterExceededFault,
    ReplicationGroupAlreadyExistsFault,
)
from cachevault.core.settings import Settings
from cachevault.nodes import credentials as creds_mod
from cachevault.nodes import restore_targets, topology
from cachevault.nodes.credentials import Credentials
from cachevault.nodes.slots import format_slot_ranges
from cachevault.nodes.topology import parse_endpoint, seed_endpoints

# Plain logging: the CLI imports this module outside any Lambda (see handler.py).
logger = logging.getLogger(__name__)

DEFAULT_NODE_TYPE = "cache.r7g.large"
KINDS = ("node-based", "serverless")


def registry_record(
    layout: Any, *, node_type: str, kind: str, data_tiering: bool, credentials: Credentials | None = None
) -> dict[str, Any]:
    primary = layout.shards[0].primary
    engine, version, rdb_version = topology.engine_info(primary.host, primary.port, credentials=credentials)
    nodes = []
    for index, shard in enumerate(layout.shards, start=1):
        group = f"{index:04d}"
        for node in [shard.primary, *shard.replicas]:
            nodes.append(
                {
                    "CacheNodeId": node.node_id,
                    "Address": f"{node.host}:{node.port}",
                    "NodeGroupId": group,
                    "Role": "primary" if node is shard.primary else "replica",
                }
            )
    return {
        "CacheName": layout.name,
        "Engine": engine,
        "EngineVersion": version,
        "MaxRdbVersion": rdb_version,
        "ClusterMode": bool(layout.cluster_mode),
        "CacheNodeType": node_type,
        "DataTiering": "enabled" if data_tiering else "disabled",
        "Kind": kind,
        "Managed": "local",
        "Status": "available",
        "NumNodeGroups": len(layout.shards),
        "ReplicasPerNodeGroup": len(layout.shards[0].replicas),
        "Endpoints": [f"{s.primary.host}:{s.primary.port}" for s in layout.shards],
        "Nodes": nodes,
    }


MAX_NODES_PER_CACHE = 500


def check_shape_values(
    *, num_shards: int | None = None, replicas: int | None = None, node_type: str | None = None
) -> None:
    """The ranges CreateReplicationGroup enforces, on the values given (0 is a value, not "unset")."""
    for field, value, low, high in (("NumNodeGroups", num_shards, 1, 500), ("ReplicasPerNodeGroup", replicas, 0, 5)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidParameterValue(f"{field} must be an integer, not {value!r}.")
        if not low <= value <= high:
            raise InvalidParameterValue(f"{field} must be between {low} and {high}, got {value}.")
    if node_type is not None:
        node_types.node_type(node_type)


def validate_shape(
    *, cluster_mode: bool, num_shards: int, replicas: int, kind: str, node_type: str | None = None
) -> None:
    """ElastiCache's CreateReplicationGroup limits; ``node_type`` is checked when given."""
    if kind not in KINDS:
        raise InvalidParameterValue(f"Kind must be one of {', '.join(KINDS)}, not {kind!r}.")
    check_shape_values(num_shards=num_shards, replicas=replicas, node_type=node_type)
    if num_shards * (1 + replicas) > MAX_NODES_PER_CACHE:
        # ElastiCache's per-cluster node quota; it also keeps a cache's record (one entry per
        # node) far under DynamoDB's 400 KB item limit.
        raise NodeQuotaForClusterExceededFault(
            f"{num_shards} shards with {replicas} replicas each is {num_shards * (1 + replicas)} nodes; "
            f"a cache has at most {MAX_NODES_PER_CACHE} nodes."
        )
    if num_shards > 1 and not cluster_mode:
        raise InvalidParameterCombination(
            "NumNodeGroups greater than 1 requires cluster mode enabled (ClusterMode=enabled)."
        )


def _catalog_for_new(settings: Settings, name: str) -> Catalog:
    """The catalog, once ``name`` is known to be free: refused before any node or secret is made."""
    catalog = Catalog(settings)
    if catalog.find_cache(name) is not None:
        raise ReplicationGroupAlreadyExistsFault(f"Replication group {name!r} already exists.")
    return catalog


def create_local_cache(
    name: str,
    *,
    cluster_mode: bool = False,
    num_shards: int = 1,
    replicas: int = 1,
    node_type: str = DEFAULT_NODE_TYPE,
    kind: str = "node-based",
    data_tiering: bool = False,
    engine: str = "redis",
    extra: dict[str, Any] | None = None,
    settings: Settings | None = None,
    auth_secret_arn: str | None = None,
    auth_password: str | None = None,
    auth_username: str | None = None,
    tls: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start the nodes as ECS tasks, then register the cache; a half-made cache is never left registered.

    ``auth_password`` stores the password in Secrets Manager (``cachevault/<name>/auth``)
    and starts the nodes with ``requirepass`` (plus an ACL user ``auth_username``);
    ``auth_secret_arn`` uses an existing secret. ``tls`` (cert_file, key_file, ca_file)
    makes TLS-only nodes; the registry records ``TransitEncryptionEnabled`` and the CA (and
    ``server_name``, the name the nodes' certificate carries, as ``TlsServerName``).
    """
    settings = settings or Settings.from_env()
    name = names.cache_name(name)
    validate_shape(
        cluster_mode=cluster_mode, num_shards=num_shards, replicas=replicas, kind=kind, node_type=node_type
    )
    if auth_secret_arn and auth_password:
        raise InvalidParameterCombination("Give --auth-secret-arn or --auth-password, not both.")
    catalog = _catalog_for_new(settings, name)
    security: dict[str, Any] = {}
    if tls:
        # The record carries the CA as PEM text: the steps that connect run elsewhere.
        security.update(
            TransitEncryptionEnabled=True,
            TlsCaBundle=creds_mod.read_ca_file(tls["ca_file"]),
            TlsCertificateFile=tls["cert_file"],
            TlsKeyFile=tls["key_file"],
        )
        if tls.get("server_name"):  # tasks get addresses at run time: the certificate names the nodes
            security["TlsServerName"] = tls["server_name"]
    if auth_password:
        security.update(AuthSecretArn=_create_secret(name, auth_username, auth_password), AuthSecretManaged=True)
    elif auth_secret_arn:
        security["AuthSecretArn"] = auth_secret_arn
    try:
        creds = creds_mod.for_cache(security)
        nodes = restore_targets.create_ecs_cache(
            name, engine=engine, cluster_mode=cluster_mode, num_shards=num_shards, replicas=replicas,
            creds=creds, tls=creds_mod.fleet_tls(security),
        )  # fmt: skip
    except Exception:
        _delete_managed_secret(security)
        raise
    try:
        record = restore_targets.ecs_record(nodes, creds, node_type=node_type, data_tiering=data_tiering)
        record["Status"] = "available"
        record.update(security)
        record.update(extra or {})
        return catalog.register_cache(record)
    except Exception:
        restore_targets.stop_tasks([n["TaskArn"] for n in restore_targets.node_entries(nodes)], "registration failed")
        _delete_managed_secret(security)
        raise


def _create_secret(cache: str, username: str | None, password: str) -> str:
    resp = client("secretsmanager").create_secret(
        Name=f"cachevault/{cache}/auth",
        SecretString=creds_mod.secret_document(username, password),
        Description=f"AUTH credentials of cache {cache} (created by cachevault cache create)",
    )
    return str(resp["ARN"])


def _delete_managed_secret(record: dict[str, Any]) -> None:
    if record.get("AuthSecretManaged") and record.get("AuthSecretArn"):
        # Already gone is fine; any other failure must be seen, not swallowed.
        with contextlib.suppress(client("secretsmanager").exceptions.ResourceNotFoundException):
            client("secretsmanager").delete_secret(
                SecretId=record["AuthSecretArn"], ForceDeleteWithoutRecovery=True
            )


def register_external_cache(
    name: str,
    endpoints: list[str],
    *,
    auth_secret_arn: str | None = None,
    auth_parameter_name: str | None = None,
    auth_username: str | None = None,
    transit_encryption: bool = False,
    tls_ca_bundle: str | None = None,
    cluster_mode: bool | None = None,
    node_type: str = DEFAULT_NODE_TYPE,
    kind: str = "node-based",
    data_tiering: bool = False,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Register a user's own Redis/Valkey (``Managed: external``) after reading its topology.

    The nodes are reached with the credentials the secret/parameter holds; the shape
    (shards, replicas, node ids) comes from the live topology, so preflight and capture
    work exactly as for a local cache. cachevault never stops or deletes such nodes.
    ``tls_ca_bundle`` is the CA as PEM text (a path is refused: see ``credentials``).
    """
    settings = settings or Settings.from_env()
    name = names.cache_name(name)
    if kind not in KINDS:
        raise InvalidParameterValue(f"Kind must be one of {', '.join(KINDS)}, not {kind!r}.")
    node_types.node_type(node_type)
    if auth_secret_arn and auth_parameter_name:
        raise InvalidParameterCombination("Give AuthSecretArn or AuthParameterName, not both.")
    seeds = [parse_endpoint(e) for e in endpoints]
    if not seeds:
        raise InvalidParameterValue("At least one --endpoint host:port is required.")
    catalog = _catalog_for_new(settings, name)
    security: dict[str, Any] = {}
    if auth_secret_arn:
        security["AuthSecretArn"] = auth_secret_arn
    if auth_parameter_name:
        security["AuthParameterName"] = auth_parameter_name
    if auth_username:
        security["AuthUsername"] = auth_username
    if transit_encryption or tls_ca_bundle:
        security["TransitEncryptionEnabled"] = True
        if tls_ca_bundle:
            security["TlsCaBundle"] = creds_mod.check_ca_pem(tls_ca_bundle)
    creds = creds_mod.for_cache(security)
    topo = topology.discover(seeds, credentials=creds)
    if cluster_mode is not None and cluster_mode != topo.cluster_mode:
        state = "enabled" if topo.cluster_mode else "disabled"
        raise InvalidParameterCombination(f"The nodes report cluster mode {state}, not what was given.")
    layout = _Layout(name, topo)
    record = registry_record(layout, node_type=node_type, kind=kind, data_tiering=data_tiering, credentials=creds)
    record["Endpoints"] = [f"{h}:{p}" for h, p in seeds]
    record["Managed"] = "external"
    record.update(security)
    return catalog.register_cache(record)


class _Layout:
    """The slice of a fleet layout registry_record reads, built from a live topology."""

    def __init__(self, name: str, topo: Any) -> None:
        self.name = name
        self.cluster_mode = topo.cluster_mode
        self.shards = topo.shards
        for shard in topo.shards:
            for node in shard.nodes:
                # Node ids ElastiCache style when the cluster gives none (cluster mode off).
                node.node_id = node.node_id or f"{node.host}:{node.port}"


def check_not_restoring(cache: dict[str, Any]) -> None:
    """A cache a restore is still creating (or loading) cannot be deleted: its execution owns it."""
    if cache.get("Status") in ("creating", "restoring") and cache.get("RestoreExecution"):
        raise InvalidReplicationGroupState(
            f"Replication group {cache['CacheName']!r} is not in available state: it is {cache['Status']!r} by "
            f"restore {cache['RestoreExecution']!r}; delete it when the restore has finished or failed (if that "
            "execution was stopped, `cachevault recover` ends it)."
        )


def delete_local_cache(name: str, settings: Settings | None = None) -> None:
    """Delete a cache cachevault made (its tasks stopped) or forget an external one (its nodes stay)."""
    settings = settings or Settings.from_env()
    catalog = Catalog(settings)
    cache = catalog.get_cache(names.cache_name(name))
    check_not_restoring(cache)
    # Tasks already stopped are fine: a failed restore stopped them and kept only its
    # record (status failed), which must still be deletable and reusable.
    restore_targets.destroy(cache, f"cache {cache['CacheName']} deleted")
    _delete_managed_secret(cache)
    _delete_automatic_snapshots(catalog, cache["CacheName"], settings)
    catalog.delete_cache(cache["CacheName"])


def _delete_automatic_snapshots(catalog: Catalog, name: str, settings: Settings) -> None:
    """As ElastiCache does on DeleteReplicationGroup: automatic snapshots go with the cache
    (manual ones, the final snapshot included, stay)."""
    from cachevault.catalog.snapshots import delete_snapshot

    for record in catalog.all_snapshots(cache=name, source="automated"):
        try:
            delete_snapshot(catalog, record["SnapshotName"], settings)
        except InvalidSnapshotState:  # being restored or copied from right now: it stays, visibly
            logger.warning("automatic snapshot %s of deleted cache %s kept: it is in use", record["SnapshotName"], name)


def describe_cache(name: str, settings: Settings | None = None) -> dict[str, Any]:
    """The registry record plus the live topology (shards, slots, replica health)."""
    settings = settings or Settings.from_env()
    cache = Catalog(settings).get_cache(names.cache_name(name))
    seeds = seed_endpoints(cache)
    try:
        topo = topology.discover(seeds, credentials=creds_mod.for_cache(cache))
    except Exception as exc:  # describe must still answer for a cache that is down
        cache["NodeGroups"] = []
        cache["TopologyError"] = str(exc)
        return cache
    cache["NodeGroups"] = [
        {
            "NodeGroupId": f"{i:04d}",
            "Slots": format_slot_ranges(shard.slots) if topo.cluster_mode else None,
            "Primary": f"{shard.primary.host}:{shard.primary.port}",
            "Replicas": [
                {"Address": f"{r.host}:{r.port}", "LinkUp": r.link_up, "LagBytes": r.lag_bytes}
                for r in shard.replicas
            ],
        }
        for i, shard in enumerate(topo.shards, start=1)
    ]
    return cache
