"""Every sample in events/ runs through ``cachevault local invoke`` against the embedded AWS.

The world the samples assume is made first: a cache ``demo-cache`` (cluster mode
disabled, one replica, deterministic keys from :func:`fill_demo`) and an available
snapshot ``demo-snapshot`` of it. The step samples are the inputs the state machines
really passed (recorded from executions' histories), so they replay a whole execution
step by step, in the order a state machine reaches them:

* CreateSnapshot of ``demo-snapshot-2``: preflight -> select sources -> start capture ->
  poll -> (the test waits for the capture to finish, as the state machine's Wait loop
  does) -> finish shard -> manifest -> mark available.
* ``snapshot_fail``: the MarkFailed input of an execution whose preflight refused the
  name ``demo-snapshot`` (it exists): MarkFailed must leave that record alone.
* RestoreSnapshot of ``demo-snapshot`` into ``demo-restored`` (2 shards, cluster mode
  enabled): preflight -> provision -> load shard -> attach replicas -> verify -> mark
  available.
* ``restore_fail``: the MarkFailed input of an execution refused because ``demo-cache``
  exists: MarkFailed must leave that cache alone.
* ``api``: GET /snapshots/demo-snapshot through the API Gateway proxy event.

Addresses and local paths are the only things that differ from machine to machine: the
samples use canonical ones (``demo-cache`` primary 127.0.0.1:7000, its replica :7001,
``demo-restored`` primaries :7100, :7101; staging under ``.cachevault``, the default
state dir from the repo root) and :func:`localize` maps them onto this run's.
Samples of other features run afterwards (``FEATURE_ORDER``, then any others by name,
then the DeleteCache chain, which ends demo-cache); any that intentionally end in a
function error are listed in ``EXPECTED_ERRORS``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cachevault.catalog import caches, storage
from cachevault.core import stack as stack_info
from cachevault_tools.cli import main as cli_main
from cachevault_tools.local import invoke
from cachevault_tools.local.environment import find_template

from tests.product_fixtures import Product, connect, sync_replicas, wait_until

EVENTS_DIR = Path(__file__).resolve().parents[2] / "events"
CANONICAL_STATE_DIR = ".cachevault"
CANONICAL_HOST = "127.0.0.1"
DEMO_CACHE_PORTS = {"primary": 7000, "replica": 7001}
DEMO_RESTORED_FIRST_PORT = 7100

# The order an execution reaches its steps (state flows from one sample to the next).
STEP_ORDER = [
    "snapshot_preflight",
    "snapshot_select_sources",
    "capture_start",
    "capture_poll",
    "capture_finish",
    "snapshot_manifest",
    "snapshot_complete",
    "snapshot_fail",
    "restore_preflight",
    "restore_provision",
    "restore_load_shard",
    "restore_load_result",  # what the Map's LoadResult hands on for a worker task: the same load's output
    "restore_attach_replicas",
    "restore_verify",
    "restore_complete",
    "restore_fail",
    "api",
]
# Other features' samples: their chains in execution order; deleting demo-cache comes last.
FEATURE_ORDER = [
    "snapshot_copy_preflight",
    "snapshot_copy_object",
    "snapshot_copy_complete",
    "snapshot_copy_fail",
    "scheduler",
    "s3_import",
]
LAST = ["delete_cache_start", "delete_cache_poll", "delete_cache_finish"]
# Samples whose purpose is a function error: file stem -> expected errorType.
EXPECTED_ERRORS: dict[str, str] = {}
# Each function cold-starts an execution environment of its own (a worker process that
# imports boto3 and Powertools), as on Lambda: about 25 cold starts on a loaded 2-core box.
TIME_BUDGET_S = 150


def fill_demo(cache: dict[str, Any], keys: int = 300) -> None:
    """Deterministic keys (no TTLs, no unordered types): the restore_verify sample's
    expected counts and sampled DUMP payloads hold for every run."""
    conn = connect(cache["Endpoints"][0])
    try:
        pipe = conn.pipeline(transaction=False)
        for i in range(keys):
            if i % 3 == 0:
                pipe.hset(f"demo:hash:{i}", mapping={"field": f"v{i}", "n": str(i)})
            elif i % 3 == 1:
                pipe.rpush(f"demo:list:{i}", "a", "b", str(i))
            else:
                pipe.set(f"demo:{i}", f"value-{i}")
        pipe.execute()
    finally:
        conn.close()
    sync_replicas(cache["Endpoints"][0], 1)


def sample_names() -> list[str]:
    return sorted(p.stem for p in EVENTS_DIR.glob("*.json"))


def run_order() -> list[str]:
    samples = sample_names()
    known = STEP_ORDER + FEATURE_ORDER + LAST
    rest = [s for s in samples if s not in known]
    return [s for s in STEP_ORDER + FEATURE_ORDER + rest + LAST if s in samples]


# ------------------------------------------------------------------------------ localize
def _port_map(product: Product) -> dict[int, tuple[str, int]]:
    """Canonical port of a sample -> this run's (host, port): every node is a task with its own address."""
    ports: dict[int, tuple[str, int]] = {}
    catalog = product.control.catalog
    demo = catalog.find_cache("demo-cache")
    if demo:
        for node in demo.get("Nodes", []):
            host, _, port = node["Address"].rpartition(":")
            ports[DEMO_CACHE_PORTS[node["Role"]]] = (host, int(port))
    restored = catalog.find_cache("demo-restored")
    if restored:
        for i, endpoint in enumerate(restored.get("Endpoints", [])):
            host, _, port = endpoint.rpartition(":")
            ports[DEMO_RESTORED_FIRST_PORT + i] = (host, int(port))
    return ports


def localize(value: Any, ports: dict[int, tuple[str, int]], state_dir: Path) -> Any:
    """Canonical addresses and staging paths of a sample -> this run's."""
    if isinstance(value, dict):
        out = {k: localize(v, ports, state_dir) for k, v in value.items()}
        if out.get("Host") == CANONICAL_HOST and out.get("Port") in ports:
            out["Host"], out["Port"] = ports[out["Port"]]
        return out
    if isinstance(value, list):
        return [localize(v, ports, state_dir) for v in value]
    if isinstance(value, str) and value.startswith(CANONICAL_STATE_DIR + "/"):
        return str(state_dir / value[len(CANONICAL_STATE_DIR) + 1 :])
    return value


# ------------------------------------------------------------------------------ world
@pytest.fixture(scope="module")
def world(product: Product) -> Iterator[dict[str, Any]]:
    cache = caches.create_local_cache("demo-cache", replicas=1, settings=product.settings)
    fill_demo(cache)
    product.control.create_snapshot("demo-cache", "demo-snapshot")
    product.control.wait_snapshot("demo-snapshot", timeout_s=60)
    yield {"cache": cache}
    for name in ("demo-restored", "demo-cache"):
        if product.control.catalog.find_cache(name) is not None:
            caches.delete_local_cache(name, product.settings)


def run_sample(product: Product, stem: str) -> invoke.Invocation:
    event = json.loads((EVENTS_DIR / f"{stem}.json").read_text())
    event = localize(event, _port_map(product), product.settings.state_dir)
    name = invoke.resolve_function(stem, product.env.info.functions, find_template())
    return invoke.invoke(name, event)


def _sample(stem: str) -> dict[str, Any]:
    return json.loads((EVENTS_DIR / f"{stem}.json").read_text())


# ------------------------------------------------------------------------------ tests
def test_every_function_in_the_template_has_a_sample() -> None:
    functions = invoke.template_functions(find_template())
    samples = set(sample_names())
    missing = sorted(set(functions.values()) - samples)
    assert not missing, f"functions without a sample in events/: {missing}"
    orphans = sorted(samples - set(functions.values()))
    assert not orphans, f"samples naming no function of template.yaml: {orphans}"


def _run(product: Product, stem: str) -> invoke.Invocation:
    if stem == "capture_finish":
        # The state machine's Wait/Poll loop: the capture runs beside the steps.
        snapshot = _sample(stem)["SnapshotName"]

        def captured() -> bool:
            progress = product.control.catalog.capture_progress(snapshot)
            return bool(progress) and all(p.get("CaptureStatus") == "done" for p in progress.values())

        wait_until(captured, 30, f"the capture of {snapshot}")
    result = run_sample(product, stem)
    expected = EXPECTED_ERRORS.get(stem)
    if expected:
        assert result.error_type == expected, (stem, result.payload)
    else:
        assert result.function_error is None, (stem, result.payload)
    return result


def test_every_sample_runs_through_local_invoke(
    product: Product, world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    samples = sample_names()
    capsys.readouterr()
    results = {stem: _run(product, stem) for stem in STEP_ORDER if stem in samples}
    _check_step_samples(product, results)
    _check_metrics(capsys.readouterr().out)
    for stem in run_order():
        if stem not in results:  # other features' samples, after the step chains
            results[stem] = _run(product, stem)
    assert time.monotonic() - started < TIME_BUDGET_S


def _check_step_samples(product: Product, results: dict[str, invoke.Invocation]) -> None:
    catalog = product.control.catalog
    # The CreateSnapshot steps made a real snapshot, objects and manifest included.
    snap = catalog.get_snapshot("demo-snapshot-2")
    assert snap["SnapshotStatus"] == "available"
    assert snap["ExecutionName"] == _sample("snapshot_preflight")["ExecutionName"]
    keys = product.s3_keys(storage.snapshot_prefix("demo-snapshot-2"))
    assert storage.rdb_key("demo-snapshot-2", 1) in keys and storage.manifest_key("demo-snapshot-2") in keys
    assert catalog.get_cache("demo-cache").get("LockedBy") is None
    # MarkFailed of another execution left demo-snapshot alone.
    assert results["snapshot_fail"].payload["SnapshotStatus"] is None
    assert catalog.get_snapshot("demo-snapshot")["SnapshotStatus"] == "available"
    assert storage.rdb_key("demo-snapshot", 1) in product.s3_keys(storage.snapshot_prefix("demo-snapshot"))
    # The RestoreSnapshot steps made a 2-shard cluster holding every key.
    restored = catalog.get_cache("demo-restored")
    assert restored["Status"] == "available" and restored["NumNodeGroups"] == 2
    assert results["restore_complete"].payload["Verification"]["Mismatches"] == []
    # A LoadShard run as a worker task hands the Map the same output, read back from S3.
    assert results["restore_load_result"].payload == results["restore_load_shard"].payload
    host, _, port = restored["Endpoints"][0].rpartition(":")
    cluster = redis.RedisCluster(host=host, port=int(port))
    try:
        assert cluster.dbsize(target_nodes=redis.RedisCluster.PRIMARIES) == 300
        assert cluster.get("demo:2") == b"value-2"
    finally:
        cluster.close()
    # MarkFailed of a refused restore left demo-cache alone.
    assert results["restore_fail"].payload["Status"] is None
    demo = catalog.get_cache("demo-cache")
    assert demo["Status"] == "available"
    assert connect(demo["Endpoints"][0]).ping()
    # The API sample describes demo-snapshot.
    api = results["api"].payload
    assert api["statusCode"] == 200
    assert json.loads(api["body"])["Snapshot"]["SnapshotName"] == "demo-snapshot"


def _check_metrics(out: str) -> None:
    """The handlers' CloudWatch EMF lines: durations, tagged with the execution name."""
    emf = [json.loads(line) for line in out.splitlines() if line.startswith('{"_aws"')]

    def metric(name: str, sample: str) -> dict[str, Any]:
        execution = _sample(sample)["ExecutionName"]
        found = [m for m in emf if name in m and m.get("ExecutionName") == execution]
        assert found, f"no {name} metric of {execution} in {emf}"
        return found[0]

    capture = metric("CaptureDuration", "capture_finish")  # a Map iteration's step
    assert 0 < capture["CaptureDuration"][0] < 30
    assert metric("BytesCaptured", "capture_finish")["BytesCaptured"][0] > 0
    assert metric("SnapshotDuration", "snapshot_complete")["SnapshotDuration"][0] > 0
    restore = metric("RestoreDuration", "restore_complete")
    assert 0 < restore["RestoreDuration"][0] < 60
    assert metric("KeysRestored", "restore_load_shard")["KeysRestored"][0] == 300
    units = {d["Name"]: d["Unit"] for m in emf for d in m["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    assert units["CaptureDuration"] == units["RestoreDuration"] == "Seconds"


def _printed_json(out: str) -> Any:
    """The CLI's JSON document (in-process, the handler's own log lines share stdout)."""
    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def test_cli_local_invoke_prints_result_and_fails_on_function_error(
    product: Product, world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The CLI finds the running service by its stack file (here: this test process).
    stack_info.save_local(product.env.info, product.settings)
    try:
        assert cli_main(["local", "invoke", "ApiFunction", "--event", str(EVENTS_DIR / "api.json")]) == 0
        out = _printed_json(capsys.readouterr().out)
        assert out["statusCode"] == 200
        assert json.loads(out["body"])["Snapshot"]["SnapshotName"] == "demo-snapshot"

        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"SnapshotName": "demo-snapshot"}))  # PollCapture needs its Shard
        assert cli_main(["local", "invoke", "capture_poll", "--event", str(bad)]) == 1
        error = _printed_json(capsys.readouterr().out)
        assert error["errorType"] == "KeyError" and "Shard" in error["errorMessage"]

        assert cli_main(["local", "invoke", "no_such_function", "--event", str(bad), "--json"]) == 254
        assert _printed_json(capsys.readouterr().out)["Error"]["Code"] == "InvalidParameterValueException"
    finally:
        stack_info.local_stack_file(product.settings).unlink(missing_ok=True)


def test_step_logs_carry_the_execution_name_as_correlation_id(
    product: Product, world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    sample = _sample("snapshot_fail")
    capsys.readouterr()
    # The handler's own stream (stdout in Lambda): the runtime forwards the worker's to ours.
    result = run_sample(product, "snapshot_fail")
    assert result.function_error is None
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    logged = [line for line in lines if line.get("message") == "snapshot failed"]
    assert logged, lines
    # The execution name, not the handler's fallback path (State.SnapshotName).
    assert logged[0]["correlation_id"] == sample["ExecutionName"] != sample["State"]["SnapshotName"]
    assert logged[0]["function_name"] == product.env.info.functions["SnapshotFailFunction"]
    assert logged[0]["level"] == "ERROR"
