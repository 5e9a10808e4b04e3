"""The embedded AWS's durable state (cachevault_tools/local/durable.py), in process and without a deploy.

A ServerAWS on a state dir, records on; objects and items written through boto3; the server
stopped and started again on the same dir, the records restored: every object answers
HeadObject exactly as before (ETag incl. the multipart ``-N`` one, metadata, content type, SSE,
checksum, storage class, last-modified, tags), user buckets are back with their settings, a
versioned bucket keeps the latest version of each key, deleted objects stay deleted, bodies of
nothing are removed, and the DynamoDB tables hold the items they held.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.exceptions import ClientError
from cachevault_tools.local import durable, dynamodb_durable, s3_durable
from cachevault_tools.local.embedded import ServerAWS
from cachevault_tools.local.redis_process import free_port

MiB = 1 << 20
TABLE = "durable-test"


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CACHEVAULT_HOME", str(tmp_path))  # the s3 bodies' dir (embedded.py _s3_dir)
    return tmp_path


@pytest.fixture
def servers() -> Iterator[list[ServerAWS]]:
    started: list[ServerAWS] = []
    yield started
    durable.uninstall()
    for aws in started:
        if aws._server is not None:
            aws.stop()


def start(state: Path, servers: list[ServerAWS]) -> ServerAWS:
    aws = ServerAWS(port=free_port()).start()
    servers.append(aws)
    durable.install(state)
    return aws


def stop(aws: ServerAWS) -> None:
    durable.uninstall()
    aws.stop()


def create_table(aws: ServerAWS) -> None:
    """What the deployer does at every start: the table, its TTL."""
    ddb = aws.client("dynamodb")
    ddb.create_table(
        TableName=TABLE,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    ddb.update_time_to_live(TableName=TABLE, TimeToLiveSpecification={"Enabled": True, "AttributeName": "expiration"})


def head(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    answer = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    answer.pop("ResponseMetadata")
    return answer


def scan(aws: ServerAWS) -> list[dict[str, Any]]:
    items = aws.client("dynamodb").scan(TableName=TABLE)["Items"]
    return sorted(items, key=lambda i: (i["pk"]["S"], i["sk"]["S"]))


def test_objects_buckets_and_items_come_back_after_a_restart(state: Path, servers: list[ServerAWS]) -> None:
    aws = start(state, servers)
    create_table(aws)
    s3 = aws.client("s3")
    s3.create_bucket(Bucket="user-data")
    s3.put_bucket_tagging(Bucket="user-data", Tagging={"TagSet": [{"Key": "team", "Value": "cache"}]})
    s3.put_bucket_encryption(
        Bucket="user-data",
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
    )
    s3.put_object(
        Bucket="user-data",
        Key="small.json",
        Body=b'{"a": 1}',
        ContentType="application/json",
        Metadata={"owner": "me"},
        ServerSideEncryption="AES256",
        ChecksumAlgorithm="SHA256",
        StorageClass="STANDARD_IA",
        Tagging="kind=small",
    )
    parts = [b"a" * (5 * MiB), b"b" * 1000]
    upload = s3.create_multipart_upload(Bucket="user-data", Key="big.bin", ChecksumAlgorithm="CRC32")
    done = [
        {
            "PartNumber": n,
            **{k: v for k, v in s3.upload_part(
                Bucket="user-data", Key="big.bin", UploadId=upload["UploadId"], PartNumber=n, Body=body,
                ChecksumAlgorithm="CRC32",
            ).items() if k in ("ETag", "ChecksumCRC32")},
        }
        for n, body in enumerate(parts, start=1)
    ]  # fmt: skip
    s3.complete_multipart_upload(
        Bucket="user-data", Key="big.bin", UploadId=upload["UploadId"], MultipartUpload={"Parts": done}
    )
    s3.copy_object(Bucket="user-data", Key="copy.json", CopySource={"Bucket": "user-data", "Key": "small.json"})
    s3.put_object(Bucket="user-data", Key="gone.txt", Body=b"deleted before the restart")
    s3.delete_object(Bucket="user-data", Key="gone.txt")
    s3.put_object(Bucket="user-data", Key="gone-too.txt", Body=b"x")
    s3.delete_objects(Bucket="user-data", Delete={"Objects": [{"Key": "gone-too.txt"}]})
    s3.create_bucket(Bucket="user-versions")
    s3.put_bucket_versioning(Bucket="user-versions", VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket="user-versions", Key="v.txt", Body=b"first")
    s3.put_object(Bucket="user-versions", Key="v.txt", Body=b"second")
    s3.create_bucket(Bucket="user-empty-then-deleted")
    s3.delete_bucket(Bucket="user-empty-then-deleted")
    cut = s3.create_multipart_upload(Bucket="user-data", Key="cut.bin")
    s3.upload_part(Bucket="user-data", Key="cut.bin", UploadId=cut["UploadId"], PartNumber=1, Body=b"p" * 100)

    ddb = aws.client("dynamodb")
    ddb.put_item(
        TableName=TABLE,
        Item={"pk": {"S": "a"}, "sk": {"S": "1"}, "n": {"N": "1.5"}, "b": {"B": b"\x00\x01"}, "expiration": {"N": "9"}},
    )
    ddb.update_item(
        TableName=TABLE,
        Key={"pk": {"S": "a"}, "sk": {"S": "1"}},
        UpdateExpression="SET tags = :t",
        ExpressionAttributeValues={":t": {"SS": ["x", "y"]}},
    )
    ddb.batch_write_item(
        RequestItems={TABLE: [{"PutRequest": {"Item": {"pk": {"S": "b"}, "sk": {"S": str(i)}}}} for i in range(3)]}
    )
    ddb.delete_item(TableName=TABLE, Key={"pk": {"S": "b"}, "sk": {"S": "2"}})
    with pytest.raises(ClientError, match="TransactionCanceled"):  # cancelled: nothing of it stays
        ddb.transact_write_items(
            TransactItems=[
                {"Put": {"TableName": TABLE, "Item": {"pk": {"S": "c"}, "sk": {"S": "1"}}}},
                {
                    "Put": {
                        "TableName": TABLE,
                        "Item": {"pk": {"S": "a"}, "sk": {"S": "1"}},
                        "ConditionExpression": "attribute_not_exists(pk)",
                    }
                },
            ]
        )
    ddb.transact_write_items(
        TransactItems=[{"Put": {"TableName": TABLE, "Item": {"pk": {"S": "d"}, "sk": {"S": "1"}}}}]
    )

    keys = ("small.json", "big.bin", "copy.json")
    before = {k: head(s3, "user-data", k) for k in keys}
    versioned = head(s3, "user-versions", "v.txt")
    items = scan(aws)
    # What a restart reads is on disk already (the records were written before each answer).
    on_disk = json.loads((state / "dynamodb" / f"{TABLE}.json").read_text())
    assert sorted((i["pk"]["S"], i["sk"]["S"]) for i in on_disk["Items"]) == [
        ("a", "1"), ("b", "0"), ("b", "1"), ("d", "1"),
    ]  # fmt: skip
    assert before["big.bin"]["ETag"].endswith('-2"')
    stop(aws)
    # A record written before multipart bodies were kept as parts names its one file as "Body" only.
    older = s3_durable._record_path(state / "s3", "user-data", "small.json")
    record = json.loads(older.read_text())
    del record["BodyFiles"]
    older.write_text(json.dumps(record))

    aws = start(state, servers)
    create_table(aws)
    restored = durable.restore(state)
    assert restored.s3.objects == 4  # small, big, copy, the latest v.txt
    assert sorted(restored.s3.buckets_created) == ["user-data", "user-versions"]
    assert restored.s3.removed_files >= 2  # the cut upload's part, v.txt's first version
    assert restored.dynamodb.items == {TABLE: 4}
    s3 = aws.client("s3")
    assert {k: head(s3, "user-data", k) for k in keys} == before
    assert head(s3, "user-versions", "v.txt") == versioned
    assert s3.get_object(Bucket="user-versions", Key="v.txt")["Body"].read() == b"second"
    big = s3.get_object(Bucket="user-data", Key="big.bin")["Body"].read()
    assert hashlib.sha256(big).digest() == hashlib.sha256(b"".join(parts)).digest()
    assert s3.get_object_tagging(Bucket="user-data", Key="small.json")["TagSet"] == [{"Key": "kind", "Value": "small"}]
    assert s3.get_bucket_tagging(Bucket="user-data")["TagSet"] == [{"Key": "team", "Value": "cache"}]
    rule = s3.get_bucket_encryption(Bucket="user-data")["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert s3.get_bucket_versioning(Bucket="user-versions")["Status"] == "Enabled"
    listed = s3.list_objects_v2(Bucket="user-data")["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(keys)
    assert "user-empty-then-deleted" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert s3.list_multipart_uploads(Bucket="user-data").get("Uploads", []) == []
    records = list((state / "s3" / "records").glob("*.json"))
    recorded = sorted(f for r in records for f in s3_durable._body_names(json.loads(r.read_text())))
    assert len(records) == 4 and len(recorded) == 5  # big.bin is its two part files
    assert sorted(p.name for p in (state / "s3").glob("obj-*")) == recorded
    assert scan(aws) == items
    assert items[0]["b"]["B"] == b"\x00\x01"

    # Writes after the restore are kept too; a deleted object's body and record go with it.
    s3.delete_object(Bucket="user-data", Key="copy.json")
    assert len(list((state / "s3" / "records").glob("*.json"))) == 3
    assert len(list((state / "s3").glob("obj-*"))) == 4
    stop(aws)


def test_a_progress_table_rewrite_stays_cheap(state: Path, servers: list[ServerAWS]) -> None:
    """Whole-table rewrites (not a journal): measured on a table ten times the size a capture writes."""
    import time

    aws = start(state, servers)
    create_table(aws)
    ddb = aws.client("dynamodb")
    for shard in range(50):
        ddb.put_item(TableName=TABLE, Item={"pk": {"S": "snap"}, "sk": {"S": f"{shard:04d}"}, "Size": {"N": "1"}})
    from moto.dynamodb.models import dynamodb_backends

    backend = dynamodb_backends[aws.client("sts").get_caller_identity()["Account"]][aws.region]
    started = time.perf_counter()
    for _ in range(100):
        dynamodb_durable.persist_table(backend, state / "dynamodb", TABLE)
    per_write = (time.perf_counter() - started) / 100
    assert per_write < 0.05, f"{per_write * 1000:.2f} ms per rewrite of a 50-item table"
    stop(aws)


def test_a_form_upload_is_kept(state: Path, servers: list[ServerAWS], monkeypatch: pytest.MonkeyPatch) -> None:
    """POST Object (a browser form): moto's IAM check needs an Authorization header, so IAM is off here."""
    monkeypatch.setenv("CACHEVAULT_LOCAL_IAM", "off")
    aws = start(state, servers)
    s3 = aws.client("s3")
    s3.create_bucket(Bucket="user-forms")
    form = s3.generate_presigned_post(Bucket="user-forms", Key="form.txt")
    posted = requests.post(form["url"], data=form["fields"], files={"file": b"from a form"}, timeout=30)
    assert posted.status_code < 300, posted.text
    stop(aws)

    aws = start(state, servers)
    assert durable.restore(state).s3.objects == 1
    assert aws.client("s3").get_object(Bucket="user-forms", Key="form.txt")["Body"].read() == b"from a form"
    stop(aws)
