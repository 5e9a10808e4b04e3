"""Where the deployed resources are: the local embedded AWS, LocalStack, or real AWS.

The local server (``cachevault local up``) writes ``<state_dir>/local/stack.json`` with
its endpoint and the physical names the deployer created from template.yaml. Without it
the names come from the CloudFormation stack's resources (LocalStack or AWS).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cachevault.core.settings import Settings

STACK_NAME = os.environ.get("CACHEVAULT_STACK", "cachevault")
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
STATE_MACHINE_ENV_SUFFIX = "_STATE_MACHINE_ARN"
# Template logical id -> the environment variable the functions (Globals) get it as.
ECS_ENV = {
    "TaskCluster": "ECS_CLUSTER",
    "CaptureWorkerTaskDefinition": "CAPTURE_TASK_DEFINITION",
    "RedisNodeTaskDefinition": "REDIS_NODE_TASK_DEFINITION",
    "ValkeyNodeTaskDefinition": "VALKEY_NODE_TASK_DEFINITION",
}


def state_machine_logical_id(env_name: str) -> str:
    """``RESTORE_SNAPSHOT_STATE_MACHINE_ARN`` -> ``RestoreSnapshotStateMachine``."""
    stem = env_name.removesuffix(STATE_MACHINE_ENV_SUFFIX)
    return "".join(part.capitalize() for part in stem.split("_") if part) + "StateMachine"


@dataclass
class StackInfo:
    bucket: str
    snapshots_table: str
    caches_table: str
    progress_table: str
    idempotency_table: str
    state_machines: dict[str, str]  # logical id -> ARN
    functions: dict[str, str] = field(default_factory=dict)  # logical id -> function name
    endpoint_url: str | None = None
    pid: int | None = None
    imports_table: str = ""
    ecs: dict[str, str] = field(default_factory=dict)  # logical id -> cluster name / task definition ARN
    # Keys of the embedded AWS's admin identity (it enforces IAM; see cachevault_tools/local/iam.py).
    credentials: dict[str, str] = field(default_factory=dict)

    def state_machine(self, logical_id: str) -> str:
        return self.state_machines[logical_id]

    def env(self) -> dict[str, str]:
        env = {
            "SNAPSHOT_BUCKET": self.bucket,
            "SNAPSHOTS_TABLE": self.snapshots_table,
            "CACHES_TABLE": self.caches_table,
            "CAPTURE_PROGRESS_TABLE": self.progress_table,
            "IDEMPOTENCY_TABLE": self.idempotency_table,
        }
        if self.imports_table:
            env["IMPORTS_TABLE"] = self.imports_table
        env.update({ECS_ENV[lid]: value for lid, value in self.ecs.items() if lid in ECS_ENV})
        if self.endpoint_url:
            env["AWS_ENDPOINT_URL"] = self.endpoint_url
        return env

    @classmethod
    def from_env(cls) -> StackInfo:
        """Inside a deployed function: names from its environment (Globals + its own).

        State machines come from ``<NAME>_STATE_MACHINE_ARN`` variables, keyed by the
        template's logical id (``CREATE_SNAPSHOT_STATE_MACHINE_ARN`` ->
        ``CreateSnapshotStateMachine``), the ids the control plane starts them by.
        """
        settings = Settings.from_env()
        machines = {
            state_machine_logical_id(name): value
            for name, value in os.environ.items()
            if name.endswith(STATE_MACHINE_ENV_SUFFIX) and value
        }
        return cls(
            bucket=settings.bucket,
            snapshots_table=settings.snapshots_table,
            caches_table=settings.caches_table,
            progress_table=settings.progress_table,
            idempotency_table=settings.idempotency_table,
            imports_table=settings.imports_table,
            state_machines=machines,
            ecs={lid: os.environ[name] for lid, name in ECS_ENV.items() if os.environ.get(name)},
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
        )

    def apply(self) -> None:
        """Point this process's boto3 clients and Settings at the stack."""
        os.environ.update(self.env())
        if self.endpoint_url:
            if self.credentials:  # the local AWS enforces IAM: only its admin keys are valid
                os.environ.update(self.credentials)
                os.environ.pop("AWS_SESSION_TOKEN", None)
            for name, value in FAKE_CREDENTIALS.items():
                os.environ.setdefault(name, value)
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def from_deployed(
    stack: Any, endpoint_url: str | None = None, pid: int | None = None, credentials: dict[str, str] | None = None
) -> StackInfo:
    """From the local deployer's DeployedStack."""
    return StackInfo(
        bucket=stack.buckets["SnapshotBucket"],
        snapshots_table=stack.tables["SnapshotsTable"],
        caches_table=stack.tables["CachesTable"],
        progress_table=stack.tables["CaptureProgressTable"],
        idempotency_table=stack.tables["IdempotencyTable"],
        imports_table=stack.tables.get("ImportsTable", ""),
        state_machines=dict(stack.state_machines),
        functions={lid: f.name for lid, f in stack.functions.items()},
        ecs=dict(getattr(stack, "ecs", {})),
        endpoint_url=endpoint_url,
        pid=pid,
        credentials=dict(credentials or {}),
    )


def local_stack_file(settings: Settings | None = None) -> Path:
    return (settings or Settings.from_env()).state_dir / "local" / "stack.json"


def save_local(info: StackInfo, settings: Settings | None = None) -> Path:
    path = local_stack_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2))
    tmp.replace(path)
    return path


def load_local(settings: Settings | None = None) -> StackInfo | None:
    path = local_stack_file(settings)
    if not path.exists():
        return None
    return StackInfo(**json.loads(path.read_text()))


def from_cloudformation(stack_name: str = STACK_NAME) -> StackInfo:
    """Physical names of a stack deployed with ``sam deploy`` (LocalStack or AWS)."""
    from cachevault.core.aws import client

    cfn = client("cloudformation")
    resources: dict[str, str] = {}
    for page in cfn.get_paginator("list_stack_resources").paginate(StackName=stack_name):
        for res in page["StackResourceSummaries"]:
            resources[res["LogicalResourceId"]] = res["PhysicalResourceId"]
    return StackInfo(
        bucket=resources["SnapshotBucket"],
        snapshots_table=resources["SnapshotsTable"],
        caches_table=resources["CachesTable"],
        progress_table=resources["CaptureProgressTable"],
        idempotency_table=resources["IdempotencyTable"],
        imports_table=resources.get("ImportsTable", ""),
        state_machines={k: v for k, v in resources.items() if k.endswith("StateMachine")},
        functions={k: v for k, v in resources.items() if k.endswith("Function")},
        ecs={k: v for k, v in resources.items() if k in ECS_ENV},
    )
