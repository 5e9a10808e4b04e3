"""What the `cachevault local up` service keeps across `local down`/`local up` and a SIGKILL.

One state dir, the real server process and CLI processes (as a user runs them): a snapshot
taken, the service stopped and started again, then SIGKILLed and started again; the snapshot
is still `available`, its catalog record can be rebuilt from the bucket, and a restore from it
holds the source's DEBUG DIGEST. A user's bucket and object survive the kill; the part files
of a multipart upload that was in flight are gone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cachevault_tools.local.redis_process import free_port

from tests.local_service import aws, digest, kill_server, primary, run_cli, run_json, snapshot, up

SNAPSHOTS_TABLE = "cachevault-snapshots"  # the deployer names tables after the stack: same on every start
USER_BUCKET = "my-exports"


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    run_cli(tmp_path, "local", "down", check=False)


def body_files(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "s3").glob("obj-*"))


def test_snapshot_and_user_objects_survive_down_up_and_sigkill(home: Path) -> None:
    port = free_port()
    up(home, port)
    run_json(home, "cache", "create", "dur-src")
    conn = primary(home, "dur-src")
    conn.mset({f"dur:{i}": f"value-{i}" * 3 for i in range(300)})
    conn.hset("dur:h", mapping={"a": "1", "b": "2"})
    conn.close()
    source = digest(primary(home, "dur-src"))
    made = run_json(home, "snapshot", "create", "dur-src", "dur-snap", "--wait")["Snapshot"]
    assert made["SnapshotStatus"] == "available"
    run_json(home, "cache", "delete", "dur-src")  # its nodes would not survive a SIGKILL of the service

    s3 = aws(home, "s3")
    s3.create_bucket(Bucket=USER_BUCKET)
    s3.put_object(
        Bucket=USER_BUCKET, Key="notes/a.txt", Body=b"kept", ContentType="text/plain", Metadata={"owner": "me"}
    )
    etag = s3.head_object(Bucket=USER_BUCKET, Key="notes/a.txt")["ETag"]

    # local down + local up: the snapshot is still there.
    run_json(home, "local", "down")
    up(home, port)
    assert snapshot(home, "dur-snap")["SnapshotStatus"] == "available"
    listing = run_json(home, "snapshot", "list")["Snapshots"]
    assert [s["SnapshotName"] for s in listing] == ["dur-snap"]

    # An upload cut by the kill: one part written, never completed.
    s3 = aws(home, "s3")
    upload = s3.create_multipart_upload(Bucket=USER_BUCKET, Key="cut.bin")
    files_before_part = body_files(home)
    s3.upload_part(Bucket=USER_BUCKET, Key="cut.bin", UploadId=upload["UploadId"], PartNumber=1, Body=b"p" * 4096)
    part_files = sorted(set(body_files(home)) - set(files_before_part))
    assert len(part_files) == 1

    kill_server(home)
    up(home, port)

    assert snapshot(home, "dur-snap")["SnapshotStatus"] == "available"
    s3 = aws(home, "s3")
    head = s3.head_object(Bucket=USER_BUCKET, Key="notes/a.txt")
    assert (head["ETag"], head["ContentType"], head["Metadata"]) == (etag, "text/plain", {"owner": "me"})
    assert s3.get_object(Bucket=USER_BUCKET, Key="notes/a.txt")["Body"].read() == b"kept"
    assert s3.list_multipart_uploads(Bucket=USER_BUCKET).get("Uploads", []) == []
    assert not set(part_files) & set(body_files(home))

    # The catalog lost (its table emptied): rebuilt from the manifests in the bucket.
    ddb = aws(home, "dynamodb")
    for item in ddb.scan(TableName=SNAPSHOTS_TABLE)["Items"]:
        ddb.delete_item(TableName=SNAPSHOTS_TABLE, Key={"SnapshotName": item["SnapshotName"]})
    assert run_json(home, "snapshot", "list")["Snapshots"] == []
    bucket = run_json(home, "local", "env")["Environment"]["SNAPSHOT_BUCKET"]
    s3.put_object(Bucket=bucket, Key="snapshots/broken/manifest.json", Body=b"{not json")
    rebuilt = run_json(home, "catalog", "rebuild")
    assert rebuilt["Added"] == ["dur-snap"] and rebuilt["Kept"] == []
    assert [s["SnapshotName"] for s in rebuilt["Skipped"]] == ["broken"]
    assert "not JSON" in rebuilt["Skipped"][0]["Reason"]
    again = run_json(home, "catalog", "rebuild")
    assert again["Added"] == [] and again["Kept"] == ["dur-snap"]
    described = snapshot(home, "dur-snap")
    assert described["SnapshotStatus"] == "available"
    assert described["ReplicationGroupId"] == "dur-src"

    restored = run_json(home, "restore", "dur-snap", "dur-dst", "--wait")["ReplicationGroup"]
    assert restored["Status"] == "available"
    assert digest(primary(home, "dur-dst")) == source
    run_json(home, "cache", "delete", "dur-dst")
