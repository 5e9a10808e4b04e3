"""Request bodies and query strings of the HTTP API, with ElastiCache's field names.

Validated with the Powertools parser (pydantic). Bodies are strict JSON: unknown fields
are refused (a typo such as ``SnapshotNmae`` must not silently fall back to a default)
and no type coercion (``"NumNodeGroups": "2"`` is an error, as in ElastiCache's API).
Query strings arrive as text, so ``MaxRecords`` is converted there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CreateSnapshotRequest(_Body):
    """POST /snapshots (ElastiCache CreateSnapshot)."""

    ReplicationGroupId: StrictStr = Field(min_length=1, max_length=40)
    SnapshotName: StrictStr = Field(min_length=1, max_length=255)
    SourceNode: StrictStr | None = None  # CacheNodeId or host:port; default: healthiest replica


class RestoreRequest(_Body):
    """POST /restores (ElastiCache CreateReplicationGroup seeded from a snapshot)."""

    ReplicationGroupId: StrictStr = Field(min_length=1, max_length=40)
    SnapshotName: StrictStr | None = Field(default=None, min_length=1, max_length=255)
    SnapshotArns: list[StrictStr] | None = Field(default=None, min_length=1, max_length=500)
    NumNodeGroups: StrictInt | None = Field(default=None, ge=1, le=500)
    ReplicasPerNodeGroup: StrictInt | None = Field(default=None, ge=0, le=5)
    CacheNodeType: StrictStr | None = Field(default=None, min_length=1)
    ClusterMode: Literal["enabled", "disabled"] | None = None
    AllowClusterModeDisable: StrictBool = False
    # The new cache's protection, by reference only: a secret in a request body is refused.
    AuthSecretArn: StrictStr | None = Field(default=None, min_length=20, max_length=2048)
    AuthParameterName: StrictStr | None = Field(default=None, min_length=1, max_length=2048)
    AuthUsername: StrictStr | None = Field(default=None, min_length=1, max_length=128)


class CopySnapshotRequest(_Body):
    """POST /snapshots/{name}/copy (ElastiCache CopySnapshot)."""

    TargetSnapshotName: StrictStr = Field(min_length=1, max_length=255)
    TargetBucket: StrictStr | None = Field(default=None, min_length=3, max_length=63)


class ListSnapshotsQuery(BaseModel):
    """GET /snapshots query string (ElastiCache DescribeSnapshots)."""

    model_config = ConfigDict(extra="forbid")

    ReplicationGroupId: str | None = Field(default=None, min_length=1, max_length=40)
    SnapshotSource: Literal["manual", "automated"] | None = None
    MaxRecords: int = Field(default=50, ge=20, le=100)
    Marker: str | None = Field(default=None, min_length=1)
