"""Fixtures for end-to-end tests of the product: template.yaml deployed into the embedded AWS.

``product`` is one embedded AWS (loopback server) per test module with template.yaml deployed
and the real handlers wired; ``new_cache`` creates registered local caches (real
redis-server processes) that are destroyed after the test.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import redis
from cachevault.catalog import caches, storage
from cachevault.core.aws import client
from cachevault.core.settings import Settings
from cachevault.ops.control_plane import ControlPlane
from cachevault_tools.local import ecs
from cachevault_tools.local.environment import LocalEnvironment
from cachevault_tools.local.fleet import Fleet
from cachevault_tools.local.redis_process import start_node

_names = itertools.count(1)


@dataclass
class Product:
    env: LocalEnvironment
    control: ControlPlane
    settings: Settings
    fleet: Fleet

    @property
    def bucket(self) -> str:
        return self.settings.bucket

    @cached_property
    def s3(self) -> Any:
        return client("s3")  # one client: making one costs ~50 ms of model loading

    def s3_keys(self, prefix: str = "") -> list[str]:
        listing = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for o in listing.get("Contents", []))

    def node_task(self, node_id: str) -> str:
        """The ECS task ARN of a cache node, by its CacheNodeId."""
        for cache in self.control.catalog.list_caches():
            for node in cache.get("Nodes", []):
                if node["CacheNodeId"] == node_id:
                    return str(node["TaskArn"])
        raise KeyError(node_id)

    def kill_node(self, node_id: str) -> None:
        """SIGKILL the node's process (a crash): its task stops, as on ECS."""
        ecs.RUNNER.kill(self.node_task(node_id))

    def node_pids(self, cache: str) -> list[int]:
        """PIDs of the cache's running node processes (one per task)."""
        record = self.control.catalog.get_cache(cache)
        return [pid for n in record.get("Nodes", []) if n.get("TaskArn") for pid in ecs.RUNNER.pids(n["TaskArn"])]

    def running_tasks(self, cache: str) -> list[str]:
        """ARNs of the ECS tasks started for ``cache`` (RunTask group) that have not stopped."""
        ecs_client = client("ecs")
        cluster = os.environ["ECS_CLUSTER"]
        arns = ecs_client.list_tasks(cluster=cluster).get("taskArns", [])
        if not arns:
            return []
        tasks = ecs_client.describe_tasks(cluster=cluster, tasks=arns)["tasks"]
        return [t["taskArn"] for t in tasks if t.get("group") == f"cachevault:{cache}" and t["lastStatus"] != "STOPPED"]

    def primary_slots(self, cache: str) -> list[tuple[str, tuple[int, int] | None]]:
        """(primary address, its slot range or None) per shard, in shard order, from the registry."""
        record = self.control.catalog.get_cache(cache)
        primaries = sorted((n for n in record["Nodes"] if n["Role"] == "primary"), key=lambda n: n["NodeGroupId"])
        out: list[tuple[str, tuple[int, int] | None]] = []
        for node in primaries:
            lo, _, hi = (node.get("Slots") or "").partition("-")
            out.append((node["Address"], (int(lo), int(hi)) if record.get("ClusterMode") and lo else None))
        return out

    def multipart_uploads(self) -> list[str]:
        listing = self.s3.list_multipart_uploads(Bucket=self.bucket)
        return [u["Key"] for u in listing.get("Uploads", [])]


def own_product(tmp_path_factory: pytest.TempPathFactory, home: str, parameters: dict[str, str]) -> Iterator[Product]:
    """Body of a product fixture: a local environment under a fresh state dir with these template parameters."""
    env = LocalEnvironment(state_dir=tmp_path_factory.mktemp(home), log_level="WARNING", parameters=parameters)
    info = env.start()
    settings = Settings.from_env()
    fleet = Fleet(settings.state_dir)
    try:
        yield Product(env=env, control=ControlPlane(info, settings), settings=settings, fleet=fleet)
    finally:
        fleet.stop_all()
        env.stop()


@pytest.fixture(scope="module")
def product(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Product]:
    # Exports go to the buckets tests create (test_snapshot_copy: user-exports-N-PID).
    yield from own_product(tmp_path_factory, "cachevault-home", {"ExportBucketAllowList": "user-exports-*"})


@pytest.fixture
def new_cache(product: Product) -> Iterator[Callable[..., dict[str, Any]]]:
    created: list[str] = []

    def make(prefix: str = "c", **kwargs: Any) -> dict[str, Any]:
        name = f"{prefix}-{next(_names)}"
        created.append(name)
        return caches.create_local_cache(name, settings=product.settings, **kwargs)

    yield make
    delete_caches(product, created)


def delete_caches(product: Product, names: list[str]) -> None:
    """Teardown of the caches a test made (those it already deleted are skipped)."""
    for name in names:
        if product.control.catalog.find_cache(name) is not None:
            caches.delete_local_cache(name, product.settings)


def host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


def connect(endpoint: str, **kwargs: Any) -> redis.Redis:
    host, port = host_port(endpoint)
    return redis.Redis(host=host, port=port, socket_timeout=60, **kwargs)


def node_digest(endpoint: str) -> tuple[Any, int]:
    """DEBUG DIGEST and DBSIZE of a live node."""
    conn = connect(endpoint)
    try:
        return conn.execute_command("DEBUG", "DIGEST"), conn.dbsize()
    finally:
        conn.close()


def nothing_left(product: Product, snapshot: str) -> None:
    """No object and no unfinished multipart upload of ``snapshot`` is left in the bucket."""
    prefix = storage.snapshot_prefix(snapshot)
    assert product.s3_keys(prefix) == []
    assert [k for k in product.multipart_uploads() if k.startswith(prefix)] == []


def object_sha256(s3: Any, bucket: str, key: str) -> str:
    """SHA-256 of an S3 object, read in 1 MiB chunks."""
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    digest = hashlib.sha256()
    for chunk in iter(lambda: body.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def node_addresses(cache: dict[str, Any], role: str) -> list[str]:
    return [n["Address"] for n in cache["Nodes"] if n["Role"] == role]


def digest_of_rdb(path: Path, workdir: Path) -> tuple[str, int]:
    """Start a throwaway redis-server on an RDB file: its DEBUG DIGEST and DBSIZE."""
    node = start_node(workdir, rdb_file=path)
    try:
        return node_digest(f"{node.host}:{node.port}")
    finally:
        node.stop()


def check_rdb(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["redis-check-rdb", str(path)], capture_output=True, text=True, timeout=120, check=False)


def download(product: Product, key: str, path: Path) -> Path:
    product.s3.download_file(product.bucket, key, str(path))
    return path


def fill(endpoint: str, *, keys: int = 2000, seed: int = 1, prefix: str = "k") -> None:
    """Mixed small dataset written through one primary (random payloads, some TTLs)."""
    conn = connect(endpoint)
    rnd = os.urandom
    pipe = conn.pipeline(transaction=False)
    for i in range(keys):
        key = f"{prefix}:{seed}:{i}"
        kind = i % 5
        if kind == 0:
            pipe.set(key, rnd(64))
        elif kind == 1:
            pipe.hset(key, mapping={f"f{j}": rnd(8) for j in range(4)})
        elif kind == 2:
            pipe.rpush(key, *[rnd(8) for _ in range(5)])
        elif kind == 3:
            pipe.zadd(key, {f"m{j}": j * 1.5 for j in range(5)})
        else:
            pipe.set(key, rnd(32), ex=3600)
    pipe.execute()
    conn.close()


def fill_cluster(cache: dict[str, Any], *, keys: int = 3000, seed: int = 1) -> None:
    """Mixed keys across a cluster-mode-enabled cache (routed by slot via CLUSTER SLOTS)."""
    host, _, port = cache["Endpoints"][0].rpartition(":")
    conn = redis.RedisCluster(host=host, port=int(port), socket_timeout=60)
    try:
        pipe = conn.pipeline()
        for i in range(keys):
            key = f"ck:{seed}:{i}"
            if i % 3 == 0:
                pipe.hset(key, mapping={"a": os.urandom(16), "b": str(i)})
            elif i % 3 == 1:
                pipe.rpush(key, *[os.urandom(8) for _ in range(3)])
            else:
                pipe.set(key, os.urandom(48))
        pipe.execute()
    finally:
        conn.close()


def sync_replicas(endpoint: str, replicas: int, timeout_ms: int = 10000) -> None:
    """Block until every replica of the primary at ``endpoint`` acknowledged all writes."""
    conn = connect(endpoint)
    try:
        acked = conn.execute_command("WAIT", replicas, timeout_ms)
    finally:
        conn.close()
    assert acked >= replicas, f"only {acked} of {replicas} replicas of {endpoint} caught up"


def fork_stats(endpoint: str) -> dict[str, int]:
    """What a fork on a node changes: saves, fork count, last fork time."""
    conn = connect(endpoint)
    try:
        persistence, stats = conn.info("persistence"), conn.info("stats")
    finally:
        conn.close()
    return {
        "rdb_saves": int(persistence["rdb_saves"]),
        "total_forks": int(stats["total_forks"]),
        "latest_fork_usec": int(stats["latest_fork_usec"]),
    }


def slow_down_saves(addresses: list[str], usec_per_key: int) -> None:
    """Stretch a node's RDB save (``rdb-key-save-delay``) so a test can act while it streams."""
    for address in addresses:
        conn = connect(address)
        try:
            conn.config_set("rdb-key-save-delay", usec_per_key)
        finally:
            conn.close()


def node_id_at(cache: dict[str, Any], address: str) -> str:
    return next(n["CacheNodeId"] for n in cache["Nodes"] if n["Address"] == address)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
