"""A restore whose steps share no disk, as on AWS (each Lambda has its own /tmp).

Every step runs through the embedded Lambda API with its own temp dir (TMPDIR and
``tempfile.tempdir``), deleted when the step returns, so a step that read a path another
step wrote would fail. A Python audit hook records every file the product code opens for
writing, creates, renames or removes: all of it must lie inside the running step's temp
dir (the local fleet and the embedded AWS, which stand in for nodes and for AWS, are not
the product's code and are not counted). LoadShards run one per environment, reading
their source into a temp file, as a stream of ranged GETs, or as the size decides.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cachevault import caches, restore_workflow, storage
from cachevault.local import invoke
from cachevault.local.environment import find_template
from cachevault.verify import cache_digest, combined_digest

from tests.file_audit import AUDIT
from tests.product_fixtures import Product, fill, fill_cluster, host_port

_runs = itertools.count(1)


class Environments:
    """One fresh temp dir per step invocation, gone when the step returns."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.used: list[tuple[str, Path, list[tuple[str, str]]]] = []

    def run(self, product: Product, function: str, event: dict[str, Any], **env: str) -> Any:
        own = Path(tempfile.mkdtemp(prefix=f"{function}-", dir=self.root))
        saved_env = {k: os.environ.get(k) for k in ("TMPDIR", *env)}
        saved_tempdir = tempfile.tempdir
        os.environ.update({"TMPDIR": str(own), **env})
        tempfile.tempdir = str(own)
        AUDIT.writes, AUDIT.opened = [], []
        AUDIT.active = True
        try:
            name = invoke.resolve_function(function, product.env.info.functions, find_template())
            result = invoke.invoke(name, event)
        finally:
            AUDIT.active = False
            tempfile.tempdir = saved_tempdir
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        writes = list(AUDIT.writes)
        outside = [(e, p) for e, p in writes if not p.startswith(str(own) + os.sep) and p != str(own)]
        assert not outside, f"{function} wrote outside its temp dir {own}: {outside}"
        elsewhere = [p for p in AUDIT.opened if p.startswith(str(self.root)) and not p.startswith(str(own))]
        assert not elsewhere, f"{function} read another step's files: {elsewhere}"
        leftovers = sorted(p.name for p in own.iterdir())
        assert not leftovers, f"{function} left files in its temp dir: {leftovers}"
        self.used.append((function, own, writes))
        own.rmdir()  # the environment goes away: nothing it held can reach a later step
        assert result.function_error is None, (function, result.payload)
        return result.payload


@pytest.fixture
def environments(tmp_path: Path) -> Environments:
    return Environments(tmp_path)


@contextlib.contextmanager
def _cache(product: Product, name: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
    cache = caches.create_local_cache(name, settings=product.settings, **kwargs)
    try:
        yield cache
    finally:
        if product.control.catalog.find_cache(name) is not None:
            caches.delete_local_cache(name, product.settings)


def _primaries(product: Product, name: str) -> list[tuple[str, int]]:
    return [host_port(e) for e in product.control.catalog.get_cache(name)["Endpoints"]]


def _restore_steps(
    environments: Environments, product: Product, request: dict[str, Any], modes: list[str]
) -> dict[str, Any]:
    """The RestoreSnapshot state machine's path, one environment per step (ASL Parameters by hand)."""
    execution = f"restore-isolated-{next(_runs)}"
    state = environments.run(product, "restore_preflight", {"Request": request, "ExecutionName": execution})
    sources = restore_workflow.restore_sources(state)  # the checked sources, an S3 object of the execution
    assert "Path" not in str(state) and not any("Path" in s for s in sources)
    assert state["SourceCount"] == len(sources) and "Sources" not in state
    state = environments.run(product, "restore_provision", state)
    assert [t["Index"] for t in state["LoadTasks"]] == [s["Index"] for s in sources]
    if not state["Seeded"]:
        results = []
        for task, mode in zip(state["LoadTasks"], itertools.cycle(modes), strict=False):
            item = {
                "Task": task,
                "Targets": state["Targets"],
                "ClusterMode": state["ClusterMode"],
                "SourcesKey": state["SourcesKey"],
                "ReplicationGroupId": state["ReplicationGroupId"],
                "ExecutionName": execution,
            }
            results.append(environments.run(product, "restore_load_shard", item, RESTORE_SOURCE_MODE=mode))
            # What a LoadShard run as a worker job hands back (read from its S3 result alone).
            assert restore_workflow.load_result_step(item) == results[-1]
        state = environments.run(product, "restore_attach_replicas", state | {"LoadResults": results})
    state = environments.run(product, "restore_verify", state)
    assert state["Verification"]["Mismatches"] == []
    done = environments.run(product, "restore_complete", state)
    assert done["Status"] == "available"
    assert product.s3_keys(storage.restore_prefix(request["ReplicationGroupId"], execution)) == []
    return done


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
                modes=["tmp", "stream", "auto"],
            )
            assert done["Seeded"] is False and done["NumNodeGroups"] == 2
            assert combined_digest(cache_digest(_primaries(product, "iso-dst"))) == digest
            assert done["LoadSummary"]["KeysLoaded"] == 6000
            loads = [(own, writes) for function, own, writes in environments.used if function == "restore_load_shard"]
            assert len(loads) == 3
            # "tmp" wrote its source into its own temp dir; "stream" wrote nothing at all.
            assert any(e == "open" and p.endswith(".rdb") for e, p in loads[0][1]), loads[0]
            assert loads[1][1] == [], loads[1]
        finally:
            if product.control.catalog.find_cache("iso-dst") is not None:
                caches.delete_local_cache("iso-dst", product.settings)


def test_same_layout_restore_and_foreign_rdb_share_no_disk(product: Product, environments: Environments) -> None:
    with _cache(product, "iso-one", replicas=0) as source:
        fill(source["Endpoints"][0], keys=3000, seed=3)
        product.control.create_snapshot("iso-one", "iso-one-snap")
        product.control.wait_snapshot("iso-one-snap", timeout_s=60)
        digest = cache_digest(_primaries(product, "iso-one"))
        made = []
        try:
            made.append("iso-seeded")
            done = _restore_steps(
                environments,
                product,
                {"SnapshotName": "iso-one-snap", "ReplicationGroupId": "iso-seeded", "ReplicasPerNodeGroup": 0},
                modes=["auto"],
            )
            assert done["Seeded"] is False  # no seeding: the same layout loads over the network too
            assert cache_digest(_primaries(product, "iso-seeded")) == digest
            # The same RDB as a foreign object (SnapshotArns): Preflight streams it, nothing staged.
            key = storage.rdb_key("iso-one-snap", 1)
            made.append("iso-foreign")
            done = _restore_steps(
                environments,
                product,
                {
                    "SnapshotArns": [f"s3://{product.bucket}/{key}"],
                    "ReplicationGroupId": "iso-foreign",
                    "ClusterMode": "enabled",
                    "NumNodeGroups": 2,
                    "ReplicasPerNodeGroup": 0,
                },
                modes=["stream"],
            )
            assert combined_digest(cache_digest(_primaries(product, "iso-foreign"))) == combined_digest(digest)
            preflights = [writes for function, _, writes in environments.used if function == "restore_preflight"]
            assert preflights[-1] == []  # the foreign RDB was checked without writing a byte
        finally:
            for name in made:
                if product.control.catalog.find_cache(name) is not None:
                    caches.delete_local_cache(name, product.settings)
