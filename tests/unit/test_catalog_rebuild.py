"""A record rebuilt from a manifest (catalog/rebuild.py) is the record the snapshot steps left.

The manifest is made by the real ``build_manifest`` from the record ``write_manifest_step``
folds together; the rebuilt record must have the same describe fields and, per shard, the
same entry as ``snapshot_record.record_entry`` (minus what only the capture knew and the
manifest does not keep: CaptureSeconds, CaptureMode).
"""

from __future__ import annotations

from typing import Any

import pytest
from cachevault.catalog import rebuild, snapshot_record, storage
from cachevault.snapshot.steps import build_manifest

NAME = "nightly"


def finished_record() -> dict[str, Any]:
    nodes = []
    for index, slots in enumerate(("0-5460", "5461-10922", "10923-16383"), start=1):
        group = f"{index:04d}"
        nodes.append(
            {
                "NodeGroupId": group,
                "CacheNodeId": f"0001-{index:03d}",
                "SourceRole": "replica",
                "CaptureStatus": "done",
                "S3Key": storage.rdb_key(NAME, index),
                "NodeGroupConfiguration": {"NodeGroupId": group, "Slots": slots},
                "Size": 1000 * index,
                "CacheSize": str(1000 * index),
                "Sha256": f"{index:064x}",
                "RdbVersion": 10,
                "KeyCount": 10 * index,
                "KeysPerDb": {"0": 10 * index},
                "ReplicationId": "r" * 40,
                "ReplicationOffset": 42,
                "CaptureStartTime": "2026-12-05T10:00:00Z",
                "CaptureEndTime": "2026-12-05T10:00:05Z",
                "SnapshotCreateTime": "2026-12-05T10:00:05Z",
                "CaptureSeconds": 5.0,
                "CaptureMode": "sync",
            }
        )
    return {
        "SnapshotName": NAME,
        "ReplicationGroupId": "orders",
        "SnapshotStatus": "available",
        "SnapshotSource": "manual",
        "CacheNodeType": "cache.local",
        "Engine": "redis",
        "EngineVersion": "7.0.15",
        "ClusterMode": True,
        "DataTiering": "disabled",
        "NumNodeGroups": 3,
        "SnapshotCreateTime": "2026-12-05T10:00:00Z",
        "NodeSnapshots": nodes,
    }


def test_a_rebuilt_record_has_the_fields_the_steps_wrote() -> None:
    record = finished_record()
    cache = {k: record[k] for k in ("CacheNodeType", "Engine", "EngineVersion", "ClusterMode", "DataTiering")}
    manifest = build_manifest(record, cache)
    rebuilt = rebuild.record_from_manifest(manifest, "bucket", storage.manifest_key(NAME))
    for field in ("SnapshotName", "ReplicationGroupId", "SnapshotSource", "CacheNodeType", "Engine", "EngineVersion"):
        assert rebuilt[field] == record[field]
    assert rebuilt["SnapshotStatus"] == "available"
    assert rebuilt["ClusterMode"] is True and rebuilt["NumNodeGroups"] == 3
    assert rebuilt["SlotsPerNodeGroup"] == ["0-5460", "5461-10922", "10923-16383"]
    assert rebuilt["CacheSize"] == "6000" and rebuilt["RdbVersion"] == 10
    assert rebuilt["ManifestKey"] == storage.manifest_key(NAME) and rebuilt["Bucket"] == "bucket"
    only_captured = {"CaptureSeconds", "CaptureMode"}
    expected = [
        {k: v for k, v in snapshot_record.record_entry(n).items() if k not in only_captured}
        for n in record["NodeSnapshots"]
    ]
    assert rebuilt["NodeSnapshots"] == expected


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: m.pop("NodeSnapshots"), "has no NodeSnapshots"),
        (lambda m: m.update(SnapshotName="other"), "names snapshot 'other'"),
        (lambda m: m["NodeSnapshots"][1].pop("Sha256"), "shard 0002 of the manifest has no Sha256"),
        (lambda m: m.update(FormatVersion=2), "FormatVersion 2"),
    ],
)
def test_a_manifest_that_cannot_be_a_record_says_why(change: Any, reason: str) -> None:
    manifest = build_manifest(finished_record(), {"ClusterMode": True})
    change(manifest)
    with pytest.raises(rebuild.Unusable, match=reason):
        rebuild.record_from_manifest(manifest, "bucket", storage.manifest_key(NAME))
