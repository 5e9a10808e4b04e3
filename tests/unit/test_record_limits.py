"""The snapshot and cache records of a 500-shard cache fit in one DynamoDB item (400 KB).

The records are made by the real steps and registry code against moto's DynamoDB (which
refuses items over the limit too), with the 500-shard topology standing in for the nodes
(topology discovery and INFO are the only node I/O), and worst-case names: a 255-character
snapshot name, a 40-character cache name, long host names and cluster node ids.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import boto3
import pytest
from cachevault.catalog import caches, storage
from cachevault.catalog.records import Catalog
from cachevault.core.errors import NodeQuotaForClusterExceededFault
from cachevault.core.settings import Settings
from cachevault.nodes import topology
from cachevault.nodes.slots import even_split
from cachevault.nodes.topology import Node, Shard, Topology
from cachevault.snapshot import steps as snapshot_workflow
from moto import mock_aws

from tests.unit.dynamodb_size import ITEM_LIMIT, item_size

CACHE = "c" * 40
SNAPSHOT = "s" * 255
PEM = "-----BEGIN CERTIFICATE-----\n" + "A" * 4000 + "\n-----END CERTIFICATE-----\n"


@pytest.fixture
def catalog(monkeypatch: pytest.MonkeyPatch) -> Iterator[Catalog]:
    # A key of its own: cachevault.core.aws caches clients per credentials.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-" + secrets.token_hex(4))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        settings = Settings.from_env()
        ddb = boto3.client("dynamodb", region_name="us-east-1")
        for table, keys in (
            (settings.caches_table, ["CacheName"]),
            (settings.progress_table, ["SnapshotName", "NodeGroupId"]),
        ):
            ddb.create_table(
                TableName=table,
                BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[{"AttributeName": k, "AttributeType": "S"} for k in keys],
                KeySchema=[{"AttributeName": k, "KeyType": t} for k, t in zip(keys, ("HASH", "RANGE"), strict=False)],
            )
        # As template.yaml declares it: the ByCache index lists a cache's snapshots by time.
        ddb.create_table(
            TableName=settings.snapshots_table,
            BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[
                {"AttributeName": k, "AttributeType": "S"}
                for k in ("SnapshotName", "ReplicationGroupId", "SnapshotCreateTime")
            ],
            KeySchema=[{"AttributeName": "SnapshotName", "KeyType": "HASH"}],
            GlobalSecondaryIndexes=[
                {
                    "IndexName": "ByCache",
                    "KeySchema": [
                        {"AttributeName": "ReplicationGroupId", "KeyType": "HASH"},
                        {"AttributeName": "SnapshotCreateTime", "KeyType": "RANGE"},
                    ],
                    "Projection": {"ProjectionType": "ALL"},
                }
            ],
        )
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=settings.bucket)
        yield Catalog(settings)


def _node(shard: int, index: int, role: str) -> Node:
    host = f"cache-node-{shard:04d}-{index}.cachevault-private.eu-west-1.compute.internal"
    return Node(host, 6379, role, True, 0, node_id=secrets.token_hex(20))


def _topology(shards: int, replicas: int) -> Topology:
    ranges = even_split(shards)
    return Topology(
        cluster_mode=True,
        shards=[
            Shard(
                f"{i:04d}",
                [ranges[i - 1]],
                _node(i, 0, "primary"),
                [_node(i, r, "replica") for r in range(1, replicas + 1)],
            )
            for i in range(1, shards + 1)
        ],
    )


class _Layout:
    def __init__(self, topo: Topology) -> None:
        self.name, self.cluster_mode, self.shards = CACHE, True, topo.shards


def _stored_size(catalog: Catalog, table: Any, key: dict[str, str]) -> int:
    return item_size(table.get_item(Key=key, ConsistentRead=True)["Item"])


@pytest.mark.parametrize(("shards", "replicas"), [(500, 0), (250, 1), (83, 5)])
def test_a_cache_record_at_the_node_quota_fits_one_item(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch, shards: int, replicas: int
) -> None:
    monkeypatch.setattr(topology, "engine_info", lambda *a, **k: ("valkey", "8.0.1", 11))
    caches.validate_shape(cluster_mode=True, num_shards=shards, replicas=replicas, kind="node-based")
    record = caches.registry_record(
        _Layout(_topology(shards, replicas)), node_type="cache.r7g.16xlarge", kind="node-based", data_tiering=False
    )
    record.update(
        AuthSecretArn="arn:aws:secretsmanager:eu-west-1:123456789012:secret:cachevault/" + CACHE + "/auth-AbCdEf",
        AuthUsername="backup",
        TransitEncryptionEnabled=True,
        TlsCaBundle=PEM,
        TlsServerName="cache.example.internal",
        SnapshotRetentionLimit=35,
        SnapshotWindow="05:00-06:00",
    )
    catalog.register_cache(record)  # moto refuses an item over the limit
    size = _stored_size(catalog, catalog.caches, {"CacheName": CACHE})
    assert len(record["Nodes"]) == shards * (1 + replicas)
    assert size < ITEM_LIMIT * 0.6, size


def test_more_nodes_than_the_quota_is_refused() -> None:
    with pytest.raises(NodeQuotaForClusterExceededFault, match="at most 500 nodes"):
        caches.validate_shape(cluster_mode=True, num_shards=500, replicas=1, kind="node-based")


def test_a_500_shard_snapshot_record_fits_one_item(catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    topo = _topology(500, 1)
    monkeypatch.setattr(topology, "discover", lambda *a, **k: topo)
    # capture_runner.plan's INFO memory (1 TiB per shard: every capture planned as an ECS task)
    memory = {"used_memory_dataset": 1 << 40, "used_memory": 1 << 40}
    monkeypatch.setattr(topology, "node_memory", lambda *a, **k: memory)
    catalog.register_cache(
        {"CacheName": CACHE, "Endpoints": [f"{topo.shards[0].primary.host}:6379"], "Engine": "valkey", "Nodes": []}
    )
    preflight_warnings = [f"Node {CACHE}-{i:04d}-001: reserved memory is 10% of 1 bytes, below ..." for i in range(6)]
    catalog.create_snapshot(
        {
            "SnapshotName": SNAPSHOT,
            "ReplicationGroupId": CACHE,
            "SnapshotStatus": "creating",
            "SnapshotSource": "manual",
            "CacheNodeType": "cache.r7g.16xlarge",
            "Engine": "valkey",
            "EngineVersion": "8.0.1",
            "ClusterMode": True,
            "DataTiering": "disabled",
            "NumNodeGroups": 500,
            "SnapshotCreateTime": "2026-11-24T22:15:49.692Z",
            "FinalSnapshot": False,
            "ExecutionName": "snapshot-" + "x" * 70,
            "Warnings": preflight_warnings,
            "Bucket": catalog.settings.bucket,
            "NodeSnapshots": [],
        }
    )
    state = snapshot_workflow.select_sources_step({"SnapshotName": SNAPSHOT, "ReplicationGroupId": CACHE})
    assert len(state["Shards"]) == 500
    # What each capture reports when done (capture_runner.run), written 25 items a request.
    with catalog.progress.batch_writer() as batch:
        for shard in state["Shards"]:
            batch.put_item(
                Item={
                    "SnapshotName": SNAPSHOT,
                    "NodeGroupId": shard["NodeGroupId"],
                    "CaptureStatus": "done",
                    "CaptureStartTime": "2026-11-24T22:15:49.692Z",
                    "CaptureEndTime": "2026-11-25T22:15:49.692Z",
                    "KeysPerDb": {"0": 123456789},
                    "KeyCount": 123456789,
                    "BytesCaptured": 1 << 40,
                    "Size": 1 << 40,
                    "Sha256": secrets.token_hex(32),
                    "RdbVersion": 11,
                    "ReplicationId": secrets.token_hex(20),
                    "ReplicationOffset": 98765432109876,
                    "CaptureMode": "psync",
                    "CaptureSeconds": Decimal("86400.123"),
                }
            )
    snapshot_workflow.write_manifest_step(state)
    catalog.update_snapshot(SNAPSHOT, SnapshotStatus="available", CacheSize=str(500 << 40))
    size = _stored_size(catalog, catalog.snapshots, {"SnapshotName": SNAPSHOT})
    assert size < ITEM_LIMIT * 0.9, size
    record = catalog.get_snapshot(SNAPSHOT)
    # Read back whole: every shard's key, size and checksum (the manifest keeps the rest).
    assert [n["S3Key"] for n in record["NodeSnapshots"]] == [storage.rdb_key(SNAPSHOT, i) for i in range(1, 501)]
    assert all(n["Size"] == 1 << 40 and len(n["Sha256"]) == 64 for n in record["NodeSnapshots"])
    manifest = storage.read_manifest(boto3.client("s3", region_name="us-east-1"), catalog.settings.bucket, SNAPSHOT)
    assert all(len(n["ReplicationId"]) == 40 for n in manifest["NodeSnapshots"])
