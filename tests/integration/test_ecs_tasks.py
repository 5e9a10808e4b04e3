"""ECS where AWS runs it: the embedded ECS, capture workers as tasks, restore targets.

The embedded AWS runs in server mode here (as ``cachevault local up`` does), so the worker
tasks the embedded ECS starts as processes can call it back. ``InlineCaptureMaxSeconds=0``
sends every shard of a capture to an ECS task and ``LoadInlineMaxBytes=0`` every source of a
restore (LoadShards' ``runTask.sync`` of ``python -m cachevault.worker load``); a 3 s
heartbeat timeout lets a hung worker be caught quickly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cachevault.catalog import caches, storage
from cachevault.core.aws import client
from cachevault.core.errors import CacheVaultError
from cachevault.nodes import restore_targets
from cachevault_tools.local import ecs
from cachevault_tools.local.redis_process import process_alive, start_node

from tests.product_fixtures import (
    Product,
    connect,
    digest_of_rdb,
    download,
    fill,
    fill_cluster,
    node_digest,
    own_product,
    slow_down_saves,
    sync_replicas,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def product(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Product]:
    parameters = {"InlineCaptureMaxSeconds": "0", "CaptureHeartbeatTimeoutSeconds": "3", "LoadInlineMaxBytes": "0"}
    yield from own_product(tmp_path_factory, "cachevault-ecs-home", parameters)


def _ecs_tasks(group: str) -> list[dict[str, Any]]:
    ecs_client = client("ecs")
    cluster = os.environ["ECS_CLUSTER"]
    arns = ecs_client.list_tasks(cluster=cluster).get("taskArns", [])
    tasks = ecs_client.describe_tasks(cluster=cluster, tasks=arns)["tasks"] if arns else []
    return [t for t in tasks if t.get("group") == group]


def _gone(pid: int) -> bool:
    """Exited and reaped: no process and no zombie left with that PID."""
    return not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


# ------------------------------------------------------------------------------ embedded ECS
def test_task_processes_run_with_their_task_roles_credentials(product: Product) -> None:
    """A task's process signs with its task role's STS credentials: allowed what the role allows, no more."""
    ecs_client, cluster = client("ecs"), os.environ["ECS_CLUSTER"]
    role = product.env.deployed.roles["WorkerTaskRole"]
    probe = (
        "import os, sys, boto3, botocore.exceptions as e\n"
        "assert os.environ['AWS_SESSION_TOKEN'] and os.environ['AWS_ACCESS_KEY_ID'] != 'testing'\n"
        "s3 = boto3.client('s3')\n"
        "s3.put_object(Bucket=os.environ['BUCKET'], Key='roles-probe/ok', Body=b'x')  # the role allows it\n"
        "try:\n"
        "    s3.list_buckets()\n"
        "except e.ClientError as exc:\n"
        "    sys.exit(0 if exc.response['Error']['Code'] == 'AccessDenied' else 3)\n"
        "sys.exit(4)  # the role does not allow ListAllMyBuckets\n"
    )
    definition = ecs_client.register_task_definition(
        family="task-role-probe",
        taskRoleArn=role,
        requiresCompatibilities=["FARGATE"],
        networkMode="awsvpc",
        cpu="256",
        memory="512",
        containerDefinitions=[
            {"name": "worker", "image": "cachevault-worker:latest", "memory": 512,
             "command": ["python", "-c", probe],
             "environment": [{"name": "BUCKET", "value": product.settings.bucket}]}
        ],
    )["taskDefinition"]["taskDefinitionArn"]  # fmt: skip
    arn = ecs_client.run_task(
        cluster=cluster,
        taskDefinition=definition,
        launchType="FARGATE",
        networkConfiguration={"awsvpcConfiguration": {"subnets": ["subnet-local"]}},
    )["tasks"][0]["taskArn"]
    task = wait_until(
        lambda: (
            (t := ecs_client.describe_tasks(cluster=cluster, tasks=[arn])["tasks"][0])["lastStatus"] == "STOPPED" and t
        ),
        60,
        "the probe task to stop",
    )
    log = (ecs.RUNNER.tasks[arn].log_dir / "worker.log").read_text()  # kept, as a log stream is
    assert task["containers"][0]["exitCode"] == 0, log


def test_run_task_sync_from_a_state_machine_runs_and_reports_the_task(product: Product) -> None:
    sfn, ecs_client = client("stepfunctions"), client("ecs")
    cluster = os.environ["ECS_CLUSTER"]
    worker = ecs_client.register_task_definition(
        family="exit-code-probe",
        requiresCompatibilities=["FARGATE"],
        networkMode="awsvpc",
        cpu="256",
        memory="512",
        containerDefinitions=[
            {"name": "worker", "image": "cachevault-worker:latest", "memory": 512,
             "command": ["python", "-c", "import os, sys; sys.exit(int(os.environ['CODE']))"]}
        ],
    )["taskDefinition"]["taskDefinitionArn"]  # fmt: skip
    definition = {
        "StartAt": "Run",
        "States": {
            "Run": {
                "Type": "Task",
                "Resource": "arn:aws:states:::ecs:runTask.sync",
                "Parameters": {
                    "Cluster": cluster,
                    "TaskDefinition": worker,
                    "LaunchType": "FARGATE",
                    "NetworkConfiguration": {"AwsvpcConfiguration": {"Subnets": ["subnet-local"]}},
                    "Overrides": {
                        "ContainerOverrides": [{"Name": "worker", "Environment": [{"Name": "CODE", "Value": "7"}]}]
                    },
                },
                "End": True,
            }
        },
    }  # fmt: skip
    # The embedded AWS enforces IAM: the state machine's role may run and watch this task only.
    trust = {"Statement": [{"Effect": "Allow", "Principal": {"Service": "states.amazonaws.com"},
                            "Action": "sts:AssumeRole"}]}  # fmt: skip
    tasks = f"arn:aws:ecs:us-east-1:123456789012:task/{cluster}/*"
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["ecs:RunTask"], "Resource": worker},
        {"Effect": "Allow", "Action": ["ecs:DescribeTasks", "ecs:StopTask"], "Resource": tasks},
    ]}  # fmt: skip
    iam = client("iam")
    role = iam.create_role(RoleName="ecs-sync-probe", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    iam.put_role_policy(RoleName="ecs-sync-probe", PolicyName="run", PolicyDocument=json.dumps(policy))
    arn = sfn.create_state_machine(name="ecs-sync-probe", definition=json.dumps(definition), roleArn=role)[
        "stateMachineArn"
    ]
    run = sfn.start_execution(stateMachineArn=arn, name="probe-1")["executionArn"]
    done = wait_until(
        lambda: (d := sfn.describe_execution(executionArn=run))["status"] != "RUNNING" and d, 60, "runTask.sync"
    )
    assert done["status"] == "SUCCEEDED", done
    task = json.loads(done["output"])
    assert task["LastStatus"] == "STOPPED" and task["StopCode"] == "EssentialContainerExited"
    assert [c["ExitCode"] for c in task["Containers"]] == [7]


def test_node_task_has_its_own_address_and_stops_without_a_zombie(product: Product) -> None:
    ecs_client = client("ecs")
    settings = restore_targets.TaskSettings.from_env()
    resp = ecs_client.run_task(
        cluster=settings.cluster,
        taskDefinition=settings.node_task_definitions["redis"],
        launchType="FARGATE",
        networkConfiguration=settings.network(),
        overrides={"containerOverrides": [{"name": "node", "command": ["redis-server", "--save", ""]}]},
    )
    task = resp["tasks"][0]
    assert task["lastStatus"] == "PROVISIONING"
    running = wait_until(
        lambda: (
            (t := ecs_client.describe_tasks(cluster=settings.cluster, tasks=[task["taskArn"]])["tasks"][0])[
                "lastStatus"
            ]
            == "RUNNING"
            and t
        ),
        30,
        "the node task to run",
    )
    address = restore_targets.task_ip(running)
    assert address and address.startswith("127.") and address != "127.0.0.1"
    assert all(c["networkInterfaces"][0]["privateIpv4Address"] == address for c in running["containers"])
    wait_until(lambda: _pings(address), 30, "redis-server at the task's address")
    (pid,) = ecs.RUNNER.pids(task["taskArn"])

    ecs_client.stop_task(cluster=settings.cluster, task=task["taskArn"], reason="test over")
    stopped = ecs_client.describe_tasks(cluster=settings.cluster, tasks=[task["taskArn"]])["tasks"][0]
    assert stopped["lastStatus"] == "STOPPED" and stopped["stopCode"] == "UserInitiated"
    assert stopped["stoppedReason"] == "test over"
    assert stopped["containers"][0]["exitCode"] == 0  # SIGTERM: redis-server shuts down cleanly
    assert _gone(pid) and not Path(f"/proc/{pid}").exists()  # reaped, not a zombie


def _init_and_node_task(ecs_client: Any, settings: Any, exit_code: int) -> str:
    """A task definition whose server starts only after an init container (the worker image)
    wrote a marker into the task volume they both mount at /data and exited with ``exit_code``."""
    node_definition = ecs_client.describe_task_definition(
        taskDefinition=settings.seeded_node_task_definitions["redis"]
    )
    worker_image = next(c["image"] for c in node_definition["taskDefinition"]["containerDefinitions"]
                        if c["name"] == "seed")  # fmt: skip
    mounts = [{"sourceVolume": "data", "containerPath": "/data"}]
    return ecs_client.register_task_definition(
        family=f"cv-init-then-node-{exit_code}",
        networkMode="awsvpc",
        requiresCompatibilities=["FARGATE"],
        cpu="256",
        memory="512",
        volumes=[{"name": "data"}],
        containerDefinitions=[
            {
                "name": "init", "image": worker_image, "essential": False, "memory": 128, "mountPoints": mounts,
                "environment": [{"name": "MARKER", "value": "/data/marker"}],
                "command": ["python", "-c", f"import os, sys; open(os.environ['MARKER'], 'w').write('init'); "
                            f"sys.exit({exit_code})"],
            },
            {
                "name": "node", "image": "redis:7.0", "essential": True, "memory": 384, "mountPoints": mounts,
                "dependsOn": [{"containerName": "init", "condition": "SUCCESS"}],
                "command": ["redis-server", "--save", ""],
            },
        ],
    )["taskDefinition"]["taskDefinitionArn"]  # fmt: skip


def _run_init_and_node_task(exit_code: int) -> tuple[Any, Any, str]:
    """(ECS client, task settings, task ARN) of a task of ``_init_and_node_task`` just run."""
    ecs_client = client("ecs")
    settings = restore_targets.TaskSettings.from_env()
    arn = ecs_client.run_task(
        cluster=settings.cluster, taskDefinition=_init_and_node_task(ecs_client, settings, exit_code),
        launchType="FARGATE", networkConfiguration=settings.network(),
    )["tasks"][0]["taskArn"]  # fmt: skip
    return ecs_client, settings, arn


def test_a_container_starts_once_its_dependency_succeeded_and_shares_its_volume(product: Product) -> None:
    ecs_client, settings, arn = _run_init_and_node_task(0)

    def described() -> dict[str, Any]:
        return ecs_client.describe_tasks(cluster=settings.cluster, tasks=[arn])["tasks"][0]

    running = wait_until(lambda: (t := described())["lastStatus"] == "RUNNING" and t, 30, "the task to run")
    init, node = running["containers"]
    assert (init["lastStatus"], init["exitCode"]) == ("STOPPED", 0)  # not essential: the task runs on
    assert node["lastStatus"] == "RUNNING"
    address = restore_targets.task_ip(running)
    wait_until(lambda: _pings(address), 30, "the server after its init container")
    conn = connect(f"{address}:6379")
    try:
        data_dir = Path(conn.config_get("dir")["dir"])  # the image works in /data: the task's volume
    finally:
        conn.close()
    assert data_dir.name == "data" and (data_dir / "marker").read_text() == "init"
    ecs_client.stop_task(cluster=settings.cluster, task=arn, reason="test over")
    assert described()["lastStatus"] == "STOPPED"
    assert not data_dir.exists()  # a stopped task's storage goes with it


def test_a_container_whose_dependency_failed_never_starts_and_the_task_stops(product: Product) -> None:
    ecs_client, settings, arn = _run_init_and_node_task(3)
    stopped = wait_until(
        lambda: (t := ecs_client.describe_tasks(cluster=settings.cluster, tasks=[arn])["tasks"][0])["lastStatus"]
        == "STOPPED" and t, 30, "the task to stop",
    )  # fmt: skip
    init, node = stopped["containers"]
    assert init["exitCode"] == 3
    assert "exitCode" not in node and node["reason"] == (
        "DependencyConditionNotMet: container init exited with code 3, condition SUCCESS"
    )
    assert stopped["stoppedReason"].startswith("Essential container node could not start: container init exited")
    assert ecs.RUNNER.pids(arn) == []


def _pings(address: str) -> bool:
    try:
        conn = connect(f"{address}:6379")
        try:
            return bool(conn.ping())
        finally:
            conn.close()
    except Exception:
        return False


# ------------------------------------------------------------------------------ capture workers
def test_three_shard_capture_runs_every_shard_in_an_ecs_task(product: Product, new_cache: Any, tmp_path: Path) -> None:
    cache = new_cache("ecap", cluster_mode=True, num_shards=3, replicas=1)
    fill_cluster(cache, keys=3000)
    for endpoint in cache["Endpoints"]:
        sync_replicas(endpoint, 1)
    digests = [node_digest(e) for e in cache["Endpoints"]]

    product.control.create_snapshot(cache["CacheName"], "ecap-snap")
    record = product.control.wait_snapshot("ecap-snap", timeout_s=120)
    assert record["SnapshotStatus"] == "available"

    tasks = _ecs_tasks("capture:ecap-snap")
    assert len(tasks) == 3  # one worker task per shard, none inline
    assert all(t["lastStatus"] == "STOPPED" and t["containers"][0]["exitCode"] == 0 for t in tasks), tasks
    shards = sorted(json.loads(_env(t, "CAPTURE_SHARD"))["NodeGroupId"] for t in tasks)
    assert shards == ["0001", "0002", "0003"]
    for index, (digest, node) in enumerate(zip(digests, record["NodeSnapshots"], strict=True), start=1):
        assert node["SourceRole"] == "replica"
        rdb = download(product, storage.rdb_key("ecap-snap", index), tmp_path / f"{index}.rdb")
        assert digest_of_rdb(rdb, tmp_path / f"check-{index}") == digest


def _env(task: dict[str, Any], name: str) -> str:
    for override in task["overrides"]["containerOverrides"]:
        for pair in override.get("environment", []):
            if pair["name"] == name:
                return str(pair["value"])
    raise KeyError(name)


def test_stalled_capture_worker_fails_its_shard_and_is_cleaned_up(product: Product, new_cache: Any) -> None:
    cache = new_cache("estall", replicas=1)
    fill(cache["Endpoints"][0], keys=4000)
    sync_replicas(cache["Endpoints"][0], 1)
    replica = next(n["Address"] for n in cache["Nodes"] if n["Role"] == "replica")
    slow_down_saves([replica], 2000)  # ~8 s of save: the worker is mid-stream when it hangs

    product.control.create_snapshot(cache["CacheName"], "estall-snap")

    def streaming() -> list[int]:
        node = (product.control.describe_snapshot("estall-snap").get("NodeSnapshots") or [{}])[0]
        tasks = _ecs_tasks("capture:estall-snap")
        if node.get("CaptureStatus") != "running" or not tasks:
            return []
        return ecs.RUNNER.pids(tasks[0]["taskArn"])

    pids = wait_until(streaming, 60, "the capture worker to stream")
    os.kill(pids[0], signal.SIGSTOP)  # hung: alive, but no more heartbeats

    with pytest.raises(CacheVaultError, match="stopped reporting progress"):
        product.control.wait_snapshot("estall-snap", timeout_s=60)
    record = product.control.describe_snapshot("estall-snap")
    assert record["SnapshotStatus"] == "failed"
    (task,) = _ecs_tasks("capture:estall-snap")
    assert task["lastStatus"] == "STOPPED" and task["stopCode"] == "UserInitiated"
    assert _gone(pids[0])
    assert [k for k in product.multipart_uploads() if k.startswith("snapshots/estall-snap/")] == []
    assert product.s3_keys("snapshots/estall-snap/") == []
    slow_down_saves([replica], 0)


# ------------------------------------------------------------------------------ restore targets
@pytest.fixture
def user_node(tmp_path: Path) -> Iterator[Any]:
    """A Redis the user runs themselves (not made by cachevault), empty."""
    node = start_node(tmp_path / "user-node")
    try:
        yield node
    finally:
        node.stop()


def test_restore_into_an_external_cache_registered_by_endpoint(
    product: Product, new_cache: Any, user_node: Any
) -> None:
    source = new_cache("extsrc", replicas=0)
    fill(source["Endpoints"][0], keys=1500)
    expected = node_digest(source["Endpoints"][0])
    product.control.create_snapshot(source["CacheName"], "ext-snap")
    product.control.wait_snapshot("ext-snap", timeout_s=60)

    endpoint = f"{user_node.host}:{user_node.port}"
    caches.register_external_cache("users-own", [endpoint], settings=product.settings)
    try:
        # Not empty: refused at preflight, nothing written to the node or the registry.
        conn = connect(endpoint)
        conn.set("already-here", "1")
        with pytest.raises(CacheVaultError, match="not empty") as refused:
            arn, name = product.control.restore("users-own", snapshot="ext-snap", replicas=0)
            product.control.wait_restore(arn, name, timeout_s=60)
        assert endpoint in str(refused.value)  # names the node that holds data
        assert conn.dbsize() == 1 and conn.get("already-here") == b"1"
        record = product.control.catalog.get_cache("users-own")
        assert record["Status"] == "available" and "RestoreExecution" not in record
        assert product.control.describe_snapshot("ext-snap")["SnapshotStatus"] == "available"

        conn.flushall()
        conn.close()
        arn, name = product.control.restore("users-own", snapshot="ext-snap", replicas=0)
        output = product.control.wait_restore(arn, name, timeout_s=60)
        assert output["Status"] == "available"
        assert node_digest(endpoint) == expected  # the user's node holds the snapshot's data
        record = product.control.catalog.get_cache("users-own")
        assert record["Managed"] == "external" and record["Status"] == "available"
        assert record["Endpoints"] == [endpoint]
        assert product.running_tasks("users-own") == []  # no node was started for it
    finally:
        caches.delete_local_cache("users-own", product.settings)
    assert process_alive(user_node.pid)  # forgetting an external cache never stops its nodes


def test_unreachable_external_target_is_refused(product: Product, tmp_path: Path) -> None:
    node = start_node(tmp_path / "gone-node")
    caches.register_external_cache("users-gone", [f"{node.host}:{node.port}"], settings=product.settings)
    node.stop()
    try:
        with pytest.raises(CacheVaultError, match="cannot be reached"):
            arn, name = product.control.restore("users-gone", s3_sources=[_any_rdb(product)], replicas=0)
            product.control.wait_restore(arn, name, timeout_s=60)
        assert product.control.catalog.get_cache("users-gone")["Status"] == "available"
    finally:
        caches.delete_local_cache("users-gone", product.settings)


def _any_rdb(product: Product) -> str:
    key = "imports-test/empty.rdb"
    rdb = ROOT / "tests" / "fixtures" / "rdb" / "valkey8_cluster_v11.rdb"
    client("s3").put_object(Bucket=product.bucket, Key=key, Body=rdb.read_bytes())
    return f"s3://{product.bucket}/{key}"


@pytest.fixture(scope="module")
def three_shard_snapshot(product: Product) -> tuple[str, int]:
    """A 3-shard cluster's snapshot and its key count."""
    source = caches.create_local_cache("ecssrc", cluster_mode=True, num_shards=3, replicas=0, settings=product.settings)
    try:
        fill_cluster(source, keys=2000)
        expected_keys = sum(node_digest(e)[1] for e in source["Endpoints"])
        product.control.create_snapshot(source["CacheName"], "ecs-3")
        product.control.wait_snapshot("ecs-3", timeout_s=120)
    finally:
        caches.delete_local_cache("ecssrc", product.settings)
    return "ecs-3", expected_keys


@pytest.mark.parametrize("shards", [2, 4])
def test_restore_into_a_new_ecs_cache_with_another_shard_count(
    product: Product, three_shard_snapshot: tuple[str, int], shards: int
) -> None:
    snapshot, expected_keys = three_shard_snapshot
    name = f"ecs-{shards}-shards"
    arn, name = product.control.restore(name, snapshot=snapshot, num_shards=shards, replicas=1)
    try:
        output = product.control.wait_restore(arn, name, timeout_s=120)
        assert output["Status"] == "available" and output["NumNodeGroups"] == shards
        assert output["Verification"]["Mismatches"] == []
        # Seeded, with one LoadShard in a worker task here (the sources together are bigger than
        # this module's inline limit): 3 -> 2, it waits for every primary's seed to cut its part;
        # 3 -> 4, it cuts the sources itself and streams each primary's part to its seed over the
        # network (restore.cutter). LoadResult reads its S3 result back, then JoinSeededCluster
        # wires the primaries and adds the replicas.
        assert output["Seeded"] is True
        assert (output["LoadSummary"]["BytesSent"] > 0) is (shards == 4)  # the cutter sends, seeds that cut read S3
        history = client("stepfunctions").get_execution_history(executionArn=arn, maxResults=1000)["events"]
        entered = [e["stateEnteredEventDetails"]["name"] for e in history if "stateEnteredEventDetails" in e]
        assert entered.count("LoadShardTask") == 1 and entered.count("LoadResult") == 1
        assert "LoadShard" not in entered and "AttachReplicas" not in entered
        assert entered.index("JoinSeededCluster") > entered.index("LoadResult")
        assert output["LoadSummary"]["KeysLoaded"] == expected_keys
        record = product.control.catalog.get_cache(name)
        assert record["Managed"] == "ecs" and record["NumNodeGroups"] == shards
        assert len(record["Nodes"]) == 2 * shards and all(n["TaskArn"] for n in record["Nodes"])
        assert len({n["Address"].rpartition(":")[0] for n in record["Nodes"]}) == 2 * shards  # one address per task
        assert all(n["Address"].endswith(":6379") for n in record["Nodes"])
        assert len(product.running_tasks(name)) == 2 * shards
        assert sum(node_digest(e)[1] for e in record["Endpoints"]) == expected_keys
    finally:
        if product.control.catalog.find_cache(name):
            caches.delete_local_cache(name, product.settings)
    assert product.running_tasks(name) == []


def test_a_cache_a_restore_is_still_creating_cannot_be_deleted(product: Product, new_cache: Any) -> None:
    source = new_cache("busysrc", replicas=0)
    fill(source["Endpoints"][0], keys=500)
    product.control.create_snapshot(source["CacheName"], "busy-snap")
    product.control.wait_snapshot("busy-snap", timeout_s=60)

    # Two shards (seeded, cut once by LoadShard), which a paused primary holds: its seed's
    # DEBUG RELOAD waits, and so does the restore.
    arn, name = product.control.restore("busy-target", snapshot="busy-snap", num_shards=2, replicas=0)
    try:
        record = wait_until(
            lambda: (c := product.control.catalog.find_cache(name)) and c.get("Nodes") and c, 60, "the new nodes"
        )
        hold = connect(record["Endpoints"][0])
        hold.execute_command("CLIENT", "PAUSE", 20000, "ALL")  # the restore cannot finish meanwhile
        try:
            assert product.control.catalog.get_cache(name)["Status"] == "creating"
            with pytest.raises(CacheVaultError, match="is 'creating' by restore") as refused:
                caches.delete_local_cache(name, product.settings)
            assert refused.value.code == "InvalidReplicationGroupStateFault"
            assert len(product.running_tasks(name)) == 2  # nothing was stopped
        finally:
            hold.execute_command("CLIENT", "UNPAUSE")
            hold.close()
        assert product.control.wait_restore(arn, name, timeout_s=60)["Status"] == "available"
    finally:
        with contextlib.suppress(CacheVaultError):  # ended either way before the cleanup
            product.control.wait_restore(arn, name, timeout_s=60)
        if product.control.catalog.find_cache(name):
            caches.delete_local_cache(name, product.settings)
    assert product.running_tasks(name) == []
