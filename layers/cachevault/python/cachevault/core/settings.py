"""Runtime settings, read from the environment a Lambda (or the local runtime) provides.

The template sets these on every function through ``Globals``; the CLI and tests set
them when they talk to the embedded AWS. ``AWS_ENDPOINT_URL`` (honoured by boto3 itself)
points every client at the embedded AWS, LocalStack or, unset, real AWS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    bucket: str
    snapshots_table: str
    caches_table: str
    progress_table: str
    idempotency_table: str
    imports_table: str
    state_dir: Path
    region: str
    reserved_memory_percent: int

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            bucket=env.get("SNAPSHOT_BUCKET", "cachevault-snapshots"),
            snapshots_table=env.get("SNAPSHOTS_TABLE", "cachevault-snapshots"),
            caches_table=env.get("CACHES_TABLE", "cachevault-caches"),
            progress_table=env.get("CAPTURE_PROGRESS_TABLE", "cachevault-capture-progress"),
            idempotency_table=env.get("IDEMPOTENCY_TABLE", "cachevault-idempotency"),
            imports_table=env.get("IMPORTS_TABLE", "cachevault-imports"),
            state_dir=Path(env.get("CACHEVAULT_HOME", Path.cwd() / ".cachevault")),
            region=env.get("AWS_REGION", env.get("AWS_DEFAULT_REGION", "us-east-1")),
            reserved_memory_percent=int(env.get("RESERVED_MEMORY_PERCENT", "25")),
        )
