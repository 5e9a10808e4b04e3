"""CopySnapshot end to end: catalog copies, exports to a user bucket, every refusal.

Everything goes through ``ControlPlane.copy_snapshot`` (what the CLI and the HTTP API
call), so the template's CopySnapshot state machine, its handlers, DynamoDB and S3 all
run; the snapshots are real captures of real redis-server caches.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cachevault.catalog import caches, storage
from cachevault.core.aws import client
from cachevault.core.errors import (
    CacheVaultError,
    InvalidParameterCombination,
    InvalidParameterValue,
    InvalidSnapshotState,
    SnapshotAlreadyExistsFault,
)

from tests.integration.test_events import EventListener, bus_listener
from tests.product_fixtures import Product, fill, node_digest, object_sha256, slow_down_saves, sync_replicas

__all__ = ["bus_listener"]  # the module-scoped fixture, shared with test_events

_buckets = itertools.count(1)


@dataclass
class Source:
    cache: dict[str, Any]
    snapshot: dict[str, Any]
    digest: tuple[bytes, int]


def _keys(bucket: str, prefix: str = "") -> list[str]:
    listing = client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def _user_bucket() -> str:
    name = f"user-exports-{next(_buckets)}-{os.getpid()}"
    client("s3").create_bucket(Bucket=name)
    return name


def _snapshot_names(product: Product) -> list[str]:
    return sorted(s["SnapshotName"] for s in product.control.catalog.all_snapshots())


def _snap(product: Product, cache: dict[str, Any], name: str) -> dict[str, Any]:
    product.control.create_snapshot(cache["CacheName"], name)
    return product.control.wait_snapshot(name, timeout_s=60)


@pytest.fixture(scope="module")
def source(product: Product, bus_listener: EventListener) -> Iterator[Source]:
    cache = caches.create_local_cache("copy-origin", replicas=1, settings=product.settings)
    try:
        primary = cache["Endpoints"][0]
        fill(primary, keys=2000, seed=11)
        sync_replicas(primary, 1)
        digest = node_digest(primary)
        yield Source(cache, _snap(product, cache, "copy-src"), digest)
    finally:
        caches.delete_local_cache(cache["CacheName"], product.settings)


# ------------------------------------------------------------------------------ copy in the catalog
def test_copy_within_catalog_then_restore_from_the_copy(
    product: Product, source: Source, bus_listener: EventListener
) -> None:
    result = product.control.copy_snapshot("copy-src", "Copy-Dst", wait=True)

    assert result["Mode"] == "copy" and result["SnapshotStatus"] == "available"
    copy = product.control.describe_snapshot("copy-dst")
    assert copy["SnapshotStatus"] == "available"
    assert copy["SnapshotSource"] == "manual" and copy["CopiedFrom"] == "copy-src"
    assert copy["ReplicationGroupId"] == source.cache["CacheName"]
    assert product.control.describe_snapshot("copy-src")["SnapshotStatus"] == "available"
    assert "CopyExecution" not in product.control.describe_snapshot("copy-src")
    assert product.control.catalog.operation_progress("copy", "copy-dst") == {}  # removed by Complete

    # Its own objects, named after it, byte-identical to the source's (SHA-256 of the manifest).
    assert product.s3_keys("snapshots/copy-dst/") == [
        "snapshots/copy-dst/copy-dst-0001.rdb",
        "snapshots/copy-dst/manifest.json",
    ]
    manifest = storage.read_manifest(client("s3"), product.bucket, "copy-dst")
    src_manifest = storage.read_manifest(client("s3"), product.bucket, "copy-src")
    assert manifest["SnapshotName"] == "copy-dst" and manifest["SnapshotSource"] == "manual"
    node, src_node = manifest["NodeSnapshots"][0], src_manifest["NodeSnapshots"][0]
    assert node["S3Key"] == "snapshots/copy-dst/copy-dst-0001.rdb"
    assert node["Sha256"] == src_node["Sha256"] == object_sha256(client("s3"), product.bucket, node["S3Key"])
    assert copy["NodeSnapshots"][0]["S3Key"] == node["S3Key"]
    assert int(copy["CacheSize"]) == node["CacheSize"] == src_node["CacheSize"]
    # Copies are encrypted at rest like every object cachevault writes (SSE-S3 by default).
    assert client("s3").head_object(Bucket=product.bucket, Key=node["S3Key"])["ServerSideEncryption"] == "AES256"
    event = bus_listener.one("Snapshot Copy Completed", SnapshotName="copy-src", TargetSnapshotName="copy-dst")
    assert event["SnapshotStatus"] == "available" and event["Objects"] == [node["S3Key"]]

    # The copy restores like any snapshot: same keys, same DEBUG DIGEST as the source cache.
    arn, name = product.control.restore("from-copy", snapshot="copy-dst")
    try:
        product.control.wait_restore(arn, name, timeout_s=60)
        restored = product.control.catalog.get_cache(name)
        assert restored["Status"] == "available"
        assert product.control.catalog.operation_progress("restore", name) == {}  # removed by MarkAvailable
        assert node_digest(restored["Endpoints"][0]) == source.digest
    finally:
        caches.delete_local_cache(name, product.settings)

    # The name is now taken: a second copy to it is refused (and leaves the source alone).
    with pytest.raises(SnapshotAlreadyExistsFault):
        product.control.copy_snapshot("copy-src", "copy-dst")
    with pytest.raises(SnapshotAlreadyExistsFault):
        product.control.copy_snapshot("copy-src", "copy-src")
    assert product.control.describe_snapshot("copy-src")["SnapshotStatus"] == "available"


# ------------------------------------------------------------------------------ export
def test_export_to_a_user_bucket_uses_elasticache_names(
    product: Product, source: Source, bus_listener: EventListener
) -> None:
    bucket = _user_bucket()
    before = _snapshot_names(product)

    result = product.control.copy_snapshot("copy-src", "nightly-export", bucket, wait=True)

    assert result["Mode"] == "export" and result["TargetBucket"] == bucket
    assert _keys(bucket) == ["nightly-export-0001.rdb"]  # at the bucket root, as ElastiCache names them
    assert [o["Key"] for o in result["Objects"]] == ["nightly-export-0001.rdb"]
    src_node = source.snapshot["NodeSnapshots"][0]
    assert object_sha256(client("s3"), bucket, "nightly-export-0001.rdb") == src_node["Sha256"]
    assert client("s3").head_object(Bucket=bucket, Key="nightly-export-0001.rdb")["ServerSideEncryption"] == "AES256"
    assert _snapshot_names(product) == before  # an export adds no catalog snapshot
    assert product.control.describe_snapshot("copy-src")["SnapshotStatus"] == "available"
    event = bus_listener.one("Snapshot Export Completed", TargetSnapshotName="nightly-export")
    assert event["TargetBucket"] == bucket and event["SnapshotName"] == "copy-src"


def test_a_failed_export_removes_what_it_wrote(product: Product, source: Source, bus_listener: EventListener) -> None:
    product.control.copy_snapshot("copy-src", "export-me", wait=True)
    record = product.control.describe_snapshot("export-me")
    client("s3").delete_object(Bucket=product.bucket, Key=record["NodeSnapshots"][0]["S3Key"])  # lost in S3
    bucket = _user_bucket()

    with pytest.raises(CacheVaultError) as failure:
        product.control.copy_snapshot("export-me", "half-export", bucket, wait=True)
    assert failure.value.code == "InvalidSnapshotStateFault"
    assert "snapshots/export-me/export-me-0001.rdb no longer exists" in failure.value.message
    assert _keys(bucket) == []
    after = product.control.describe_snapshot("export-me")
    assert after["SnapshotStatus"] == "available" and "CopyExecution" not in after
    event = bus_listener.one("Snapshot Export Failed", SnapshotName="export-me")
    assert event["TargetBucket"] == bucket and event["SnapshotStatus"] == "available"
    assert event["FailureReason"]


def test_export_refusals_write_nothing(product: Product, source: Source) -> None:
    bucket = _user_bucket()
    client("s3").put_object(Bucket=bucket, Key="taken-0001.rdb", Body=b"the user's own object")
    before = _snapshot_names(product)

    # Outside the deployment's ExportBucketAllowList (the product fixture allows user-exports-*).
    with pytest.raises(InvalidParameterValue, match="not in this deployment's ExportBucketAllowList"):
        product.control.copy_snapshot("copy-src", "anywhere", "no-such-bucket-here")
    with pytest.raises(InvalidParameterValue, match="does not exist"):
        product.control.copy_snapshot("copy-src", "anywhere", f"user-exports-missing-{os.getpid()}")
    with pytest.raises(InvalidParameterValue, match=r"taken-0001\.rdb.*already exists"):
        product.control.copy_snapshot("copy-src", "taken", bucket)

    assert _keys(bucket) == ["taken-0001.rdb"]
    assert client("s3").get_object(Bucket=bucket, Key="taken-0001.rdb")["Body"].read() == b"the user's own object"
    assert _snapshot_names(product) == before
    assert product.control.describe_snapshot("copy-src")["SnapshotStatus"] == "available"


# ------------------------------------------------------------------------------ data tiering, failures
def test_refusals_for_a_creating_or_data_tiering_snapshot_and_a_failed_copy(
    product: Product, new_cache: Any, bus_listener: EventListener
) -> None:
    cache = new_cache("tiered", node_type="cache.r6gd.xlarge", data_tiering=True, replicas=1)
    fill(cache["Endpoints"][0], keys=300, seed=12)
    sync_replicas(cache["Endpoints"][0], 1)
    replica = next(n["Address"] for n in cache["Nodes"] if n["Role"] == "replica")
    slow_down_saves([replica], 5000)  # ~1.5 s of capture: the snapshot stays creating meanwhile

    product.control.create_snapshot(cache["CacheName"], "tiered-snap")
    with pytest.raises(InvalidSnapshotState, match="creating"):
        product.control.copy_snapshot("tiered-snap", "too-early")
    assert product.control.catalog.find_snapshot("too-early") is None
    slow_down_saves([replica], 0)
    snap = product.control.wait_snapshot("tiered-snap", timeout_s=60)
    assert snap["DataTiering"] == "enabled"

    bucket = _user_bucket()
    with pytest.raises(InvalidParameterCombination, match="data tiering"):
        product.control.copy_snapshot("tiered-snap", "tiered-export", bucket)
    assert _keys(bucket) == []
    assert product.control.describe_snapshot("tiered-snap")["SnapshotStatus"] == "available"

    # A failure after the copy was accepted: the source object went missing in S3.
    client("s3").delete_object(Bucket=product.bucket, Key=snap["NodeSnapshots"][0]["S3Key"])
    with pytest.raises(InvalidSnapshotState, match="no longer exists"):
        product.control.copy_snapshot("tiered-snap", "tiered-copy", wait=True)
    failed = product.control.describe_snapshot("tiered-copy")
    assert failed["SnapshotStatus"] == "failed"
    assert failed["FailureReason"].startswith("InvalidSnapshotState: The snapshot's object")
    assert product.s3_keys("snapshots/tiered-copy/") == []
    source_after = product.control.describe_snapshot("tiered-snap")
    assert source_after["SnapshotStatus"] == "available" and "CopyExecution" not in source_after
    event = bus_listener.one("Snapshot Copy Failed", SnapshotName="tiered-snap")
    assert event["TargetSnapshotName"] == "tiered-copy" and event["FailureReason"] == failed["FailureReason"]
    # Refusals are API errors, not events (as in ElastiCache): nothing for too-early / tiered-export.
    assert bus_listener.find("Snapshot Copy Failed", TargetSnapshotName="too-early") == []
    assert bus_listener.find("Snapshot Export Failed", TargetSnapshotName="tiered-export") == []


# ------------------------------------------------------------------------------ the copy primitive
def test_large_objects_are_copied_with_multipart_server_side(product: Product) -> None:
    # Imported here: the step modules create Powertools objects, which must happen in a handler's env.
    from cachevault.ops import copy_steps as copy_workflow

    bucket = _user_bucket()
    data = os.urandom(11 << 20)
    s3 = client("s3")
    s3.put_object(Bucket=bucket, Key="big.rdb", Body=data)
    head = copy_workflow.copy_object(
        s3, bucket, "big.rdb", bucket, "big-copy.rdb", multipart_threshold=5 << 20, multipart_chunk=5 << 20
    )
    assert head["ETag"].strip('"').endswith("-3")  # three UploadPartCopy parts, no GET/PUT of the body
    assert head["ContentLength"] == len(data)
    assert object_sha256(client("s3"), bucket, "big-copy.rdb") == hashlib.sha256(data).hexdigest()
