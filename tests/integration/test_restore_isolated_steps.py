"""A restore whose steps share no disk, as on AWS (each Lambda has its own /tmp).

Every step runs through the embedded Lambda API in the execution environments of its own
function: worker processes with a private ``/tmp`` of their own (a tmpfs in a mount
namespace), everything else read-only, frozen between invocations (cachevault_tools/local/
lambda_runtime.py). A step that read a file another step wrote would find nothing there,
so a restore that completes with equal digests proves the steps share no disk. The test
also checks that the load steps ran in other environments (other processes) than the
preflight, and that every one of these functions had every Lambda restriction on.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
from cachevault.catalog import caches, storage
from cachevault.restore import steps as restore_workflow
from cachevault.restore.verify import cache_digest, combined_digest
from cachevault_tools.local import invoke, lambda_runtime
from cachevault_tools.local.environment import find_template

from tests.product_fixtures import Product, fill, fill_cluster, host_port

_runs = itertools.count(1)


class Environments:
    """Runs steps through the embedded Lambda API; remembers which processes served each function."""

    def __init__(self) -> None:
        self.pids: dict[str, set[int]] = {}

    def run(self, product: Product, function: str, event: dict[str, Any]) -> Any:
        name = invoke.resolve_function(function, product.env.info.functions, find_template())
        result = invoke.invoke(name, event)
        assert result.function_error is None, (function, result.payload)
        assert lambda_runtime.RUNTIME.semantics_for(name) == lambda_runtime.LambdaSemantics()
        live = {e.pid for e in lambda_runtime.RUNTIME.environments(name) if e.pid is not None}
        assert live, f"{function} ran in no live execution environment"
        self.pids.setdefault(function, set()).update(live)
        return result.payload


@pytest.fixture
def environments() -> Environments:
    return Environments()


@contextlib.contextmanager
def _cache(product: Product, name: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
    cache = caches.create_local_cache(name, settings=product.settings, **kwargs)
    try:
        yield cache
    finally:
        if product.control.catalog.find_cache(name) is not None:
            caches.delete_local_cache(name, product.settings)


def _drop(product: Product, name: str) -> None:
    """Teardown of a target the test's hand-driven steps made (a failed run leaves it creating)."""
    catalog = product.control.catalog
    if (record := catalog.find_cache(name)) is None:
        return
    if record.get("Status") == "creating":  # no MarkFailed ran: the steps were driven by hand
        catalog.update_cache(name, Status="failed")
    caches.delete_local_cache(name, product.settings)


def _primaries(product: Product, name: str) -> list[tuple[str, int]]:
    return [host_port(e) for e in product.control.catalog.get_cache(name)["Endpoints"]]


def _restore_steps(environments: Environments, product: Product, request: dict[str, Any]) -> dict[str, Any]:
    """The RestoreSnapshot state machine's path, one environment per step (ASL Parameters by hand)."""
    execution = f"restore-isolated-{next(_runs)}"
    state = environments.run(product, "restore_preflight", {"Request": request, "ExecutionName": execution})
    assert "Path" not in json.dumps(state)  # names only, never a path of this step's disk
    state = environments.run(product, "restore_provision", state)
    assert state["LoadTasks"] and state["Targets"]  # nodes are ECS tasks: every restore loads over the network
    if not state["Seeded"]:  # ReplicasStarted?: before the load, as the ASL runs it
        state = environments.run(product, "restore_attach_replicas", state)
    results = []
    for task in state["LoadTasks"]:
        item = {
            "Task": task,
            "Targets": state["Targets"],
            "ClusterMode": state["ClusterMode"],
            "Seeded": state["Seeded"],
            "SourcesKey": state["SourcesKey"],
            "ReplicationGroupId": state["ReplicationGroupId"],
            "ExecutionName": execution,
        }
        results.append(environments.run(product, "restore_load_shard", item))
        # What a LoadShard run as a worker job hands back (read from its S3 result alone).
        assert restore_workflow.load_result_step(item) == results[-1]
    state = state | {"LoadResults": results}
    if state["Seeded"] and state["ClusterMode"]:  # ClusterJoined?: JoinSeededCluster
        state = environments.run(product, "restore_attach_replicas", state)
    state = environments.run(product, "restore_verify", state)
    assert state["Verification"]["Mismatches"] == []
    done = environments.run(product, "restore_complete", state)
    assert done["Status"] == "available"
    assert product.s3_keys(storage.restore_prefix(request["ReplicationGroupId"], execution)) == []
    return done


def _ran_apart(environments: Environments) -> None:
    """The load steps ran in other processes than the preflight (and than each other step)."""
    preflight = environments.pids["restore_preflight"]
    for function, pids in environments.pids.items():
        if function != "restore_preflight":
            assert not pids & preflight, (function, pids, preflight)


def test_resharding_restore_whose_load_steps_share_no_disk(product: Product, environments: Environments) -> None:
    with _cache(product, "iso-src", cluster_mode=True, num_shards=3, replicas=0) as source:
        fill_cluster(source, keys=6000, seed=7)
        product.control.create_snapshot("iso-src", "iso-snap")
        product.control.wait_snapshot("iso-snap", timeout_s=60)
        digest = combined_digest(cache_digest(_primaries(product, "iso-src")))
        try:
            done = _restore_steps(
                environments,
                product,
                {
                    "SnapshotName": "iso-snap",
                    "ReplicationGroupId": "iso-dst",
                    "NumNodeGroups": 2,
                    "ReplicasPerNodeGroup": 1,
                },
            )
            assert done["NumNodeGroups"] == 2
            assert combined_digest(cache_digest(_primaries(product, "iso-dst"))) == digest
            assert done["LoadSummary"]["KeysLoaded"] == 6000
            _ran_apart(environments)
        finally:
            _drop(product, "iso-dst")


def test_foreign_rdb_restore_shares_no_disk(product: Product, environments: Environments) -> None:
    with _cache(product, "iso-one", replicas=0) as source:
        fill(source["Endpoints"][0], keys=3000, seed=3)
        product.control.create_snapshot("iso-one", "iso-one-snap")
        product.control.wait_snapshot("iso-one-snap", timeout_s=60)
        digest = cache_digest(_primaries(product, "iso-one"))
        try:
            # The RDB as a foreign object (SnapshotArns): Preflight streams it from S3, nothing staged.
            key = storage.rdb_key("iso-one-snap", 1)
            _restore_steps(
                environments,
                product,
                {
                    "SnapshotArns": [f"s3://{product.bucket}/{key}"],
                    "ReplicationGroupId": "iso-foreign",
                    "ClusterMode": "enabled",
                    "NumNodeGroups": 2,
                    "ReplicasPerNodeGroup": 0,
                },
            )
            assert combined_digest(cache_digest(_primaries(product, "iso-foreign"))) == combined_digest(digest)
            _ran_apart(environments)
        finally:
            _drop(product, "iso-foreign")
