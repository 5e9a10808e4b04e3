"""S3 import trigger: an RDB put under ``imports/`` of the snapshot bucket becomes a cache.

The upload goes through the template's S3 notification (``imports/`` + ``.rdb``) to the
real handler, which moto runs inside PutObject; it only starts the RestoreSnapshot
execution, whose outcome the imports record resolves. The RDB is made by a real
redis-server (SAVE), and the restored cache is compared with DEBUG DIGEST.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus

import pytest
from cachevault.core.aws import client
from cachevault.core.errors import ImportNotFoundFault, InvalidParameterValue
from cachevault.ops import imports
from cachevault_tools.local.redis_process import start_node

from tests.integration.test_events import EventListener, bus_listener
from tests.product_fixtures import Product, connect, delete_caches, fill, node_digest, wait_until

__all__ = ["bus_listener"]  # the module-scoped fixture, shared with test_events


@dataclass
class SeedRdb:
    body: bytes
    digest: bytes
    keys: int


@pytest.fixture(scope="module")
def seed_rdb(tmp_path_factory: pytest.TempPathFactory) -> SeedRdb:
    """An RDB redis-server itself wrote (SAVE), with its DEBUG DIGEST and key count."""
    node = start_node(tmp_path_factory.mktemp("seed-node"))
    try:
        endpoint = f"{node.host}:{node.port}"
        fill(endpoint, keys=1500, seed=31)
        conn = connect(endpoint)
        try:
            digest, keys = conn.execute_command("DEBUG", "DIGEST"), conn.dbsize()
            conn.save()
        finally:
            conn.close()
        body = (node.data_dir / "dump.rdb").read_bytes()
    finally:
        node.stop()
    return SeedRdb(body, digest, keys)


@pytest.fixture
def cleanup(product: Product) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    delete_caches(product, names)


def _upload(product: Product, key: str, body: bytes, **metadata: str) -> None:
    if metadata:
        # Copied into imports/ with the name as metadata: moto's PutObject notifies before it
        # stores the metadata (real S3 does not), its CopyObject after.
        staged = "uploads/" + key.rsplit("/", 1)[-1]
        client("s3").put_object(Bucket=product.bucket, Key=staged, Body=body)
        client("s3").copy_object(
            Bucket=product.bucket,
            Key=key,
            CopySource={"Bucket": product.bucket, "Key": staged},
            Metadata=metadata,
            MetadataDirective="REPLACE",
        )
    else:
        client("s3").put_object(Bucket=product.bucket, Key=key, Body=body)


def _import_of(product: Product, key: str) -> dict[str, Any]:
    found = [i for i in imports.list_imports(product.settings) if i["Key"] == key]
    assert len(found) == 1, found
    return found[0]


def _settled(product: Product, key: str, timeout: float = 60) -> dict[str, Any]:
    return wait_until(
        lambda: (lambda i: i if i["Status"] in ("available", "failed") else None)(_import_of(product, key)),
        timeout,
        f"the import of {key} to finish",
        interval=0.3,
    )


# ------------------------------------------------------------------------------ the happy path
def test_uploaded_rdb_becomes_a_cache_with_the_same_data(
    product: Product, seed_rdb: SeedRdb, bus_listener: EventListener, cleanup: list[str]
) -> None:
    cleanup.append("seeded-cache")
    _upload(product, "imports/seeded-cache.rdb", seed_rdb.body)
    put_returned = datetime.now(UTC)

    started = _import_of(product, "imports/seeded-cache.rdb")
    assert started["CacheName"] == "seeded-cache" and started["NameSource"] == "key"
    assert started["Size"] == len(seed_rdb.body)
    assert started["Status"] in ("restoring", "available")

    done = _settled(product, "imports/seeded-cache.rdb")
    assert done["Status"] == "available", done
    # The handler only starts the restore: PutObject returned before the restore ended.
    ended = wait_until(
        lambda: (d := product.control.describe_execution(done["ExecutionArn"]))["status"] != "RUNNING" and d,
        60,
        "the import's restore execution to end",
    )
    assert ended["status"] == "SUCCEEDED" and ended["stopDate"] > put_returned
    cache = product.control.catalog.get_cache("seeded-cache")
    assert cache["Status"] == "available"
    assert cache["RestoreSource"] == f"arn:aws:s3:::{product.bucket}/imports/seeded-cache.rdb"
    assert cache["RestoreExecution"] == done["ExecutionName"]
    assert node_digest(cache["Endpoints"][0]) == (seed_rdb.digest, seed_rdb.keys)
    event = bus_listener.one("Restore Completed", ReplicationGroupId="seeded-cache")
    assert event["RestoreSource"] == cache["RestoreSource"]
    assert imports.describe_import("seeded-cache", product.settings)["ImportId"] == done["ImportId"]


def test_metadata_name_wins_and_a_redelivery_starts_nothing(
    product: Product, seed_rdb: SeedRdb, cleanup: list[str]
) -> None:
    cleanup.append("from-metadata")
    key = "imports/team-a/Whatever Name.rdb"
    _upload(product, key, seed_rdb.body, **{"cache-name": "From-Metadata"})
    done = _settled(product, key)
    assert done["Status"] == "available", done
    assert done["CacheName"] == "from-metadata" and done["NameSource"] == "metadata"
    assert product.control.catalog.find_cache("whatever-name") is None
    assert node_digest(product.control.catalog.get_cache("from-metadata")["Endpoints"][0])[1] == seed_rdb.keys

    # S3 delivers at least once: the same notification again (URL-encoded key, as S3 sends
    # it) through the deployed function is recognised and starts no second restore.
    etag = client("s3").head_object(Bucket=product.bucket, Key=key)["ETag"].strip('"')
    record = {
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": product.bucket}, "object": {"key": quote_plus(key, safe="/"), "eTag": etag}},
    }
    function = product.env.deployed.functions["S3ImportFunction"].name
    reply = client("lambda").invoke(FunctionName=function, Payload=json.dumps({"Records": [record]}))
    result = json.loads(reply["Payload"].read())
    assert [i["Status"] for i in result["Imports"]] == ["duplicate"], result
    machine = product.control.stack.state_machine("RestoreSnapshotStateMachine")
    runs = client("stepfunctions").list_executions(stateMachineArn=machine)["executions"]
    assert len([r for r in runs if r["name"].startswith("import-from-metadata-")]) == 1


# ------------------------------------------------------------------------------ failures are recorded
def test_bad_names_and_non_rdb_uploads_are_recorded_failures(
    product: Product, seed_rdb: SeedRdb, bus_listener: EventListener, cleanup: list[str]
) -> None:
    before = {c["CacheName"] for c in product.control.catalog.list_caches()}

    _upload(product, "imports/2026_orders.rdb", seed_rdb.body)  # cannot start with a digit
    _upload(product, "imports/bad-meta.rdb", seed_rdb.body, **{"cache-name": "no--double"})
    _upload(product, "imports/not-an-rdb.rdb", b"id,name\n1,orders\n")
    cleanup.append("cut-short")
    _upload(product, "imports/cut-short.rdb", seed_rdb.body[: len(seed_rdb.body) // 2])

    bad_key = _import_of(product, "imports/2026_orders.rdb")
    assert bad_key["Status"] == "failed" and "ExecutionArn" not in bad_key
    assert bad_key["FailureReason"].startswith("InvalidParameterValueException: Cannot name a cache after")
    assert "x-amz-meta-cache-name" in bad_key["FailureReason"]
    bad_meta = _import_of(product, "imports/bad-meta.rdb")
    assert bad_meta["Status"] == "failed" and "consecutive hyphens" in bad_meta["FailureReason"]
    not_rdb = _import_of(product, "imports/not-an-rdb.rdb")
    assert not_rdb["Status"] == "failed" and "is not an RDB file" in not_rdb["FailureReason"]
    assert not_rdb["CacheName"] == "not-an-rdb"  # named, then refused before any restore
    refused = bus_listener.find("Restore Failed", RestoreSource=not_rdb["SnapshotArn"])
    assert len(refused) == 1 and refused[0]["detail"]["FailureReason"] == not_rdb["FailureReason"]

    # A truncated RDB passes the magic check; the restore itself fails and the import says why.
    cut = _settled(product, "imports/cut-short.rdb")
    assert cut["Status"] == "failed" and cut["FailureReason"]
    assert product.control.catalog.get_cache("cut-short")["Status"] == "failed"  # never healthy

    after = {c["CacheName"] for c in product.control.catalog.list_caches()}
    assert after - before == {"cut-short"}
    with pytest.raises(ImportNotFoundFault):
        imports.describe_import("never-uploaded", product.settings)


def test_cache_names_from_keys() -> None:
    assert imports.cache_name_from_key("imports/orders-2026.rdb") == "orders-2026"
    assert imports.cache_name_from_key("imports/team/Orders_2026 (copy).RDB") == "orders-2026-copy"
    assert imports.cache_name_from_key("imports/a..b.rdb") == "a-b"
    for bad in ("imports/2026.rdb", "imports/___.rdb", "imports/" + "x" * 41 + ".rdb"):
        with pytest.raises(InvalidParameterValue):
            imports.cache_name_from_key(bad)
