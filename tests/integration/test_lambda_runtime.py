"""The local Lambda runtime fails where AWS Lambda would (tests/fixtures/lambdaapp).

Every function of the probe app runs with all of Lambda's restrictions (the runtime's
default): its own worker processes, frozen between invocations, a read-only file system
but a private /tmp of EphemeralStorage, Timeout and MemorySize enforced, no Redis
binaries, credentials of its role.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cachevault_tools.local import lambda_runtime, layer_build
from cachevault_tools.local.deployer import DeployedStack
from cachevault_tools.local.embedded import ServerAWS
from cachevault_tools.local.redis_process import free_port

from tests.integration.test_embedded_aws import history, wait_execution
from tests.product_fixtures import wait_until

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "tests" / "fixtures" / "lambdaapp" / "template.yaml"
CODE_DIR = APP.parent / "functions" / "probe"


@pytest.fixture(scope="module")
def stack() -> Iterator[DeployedStack]:
    with ServerAWS(port=free_port()) as aws:
        yield aws.deploy(APP, stack_name="lrt")


def call(stack: DeployedStack, logical_id: str, event: dict[str, Any]) -> tuple[Any, str | None]:
    resp = stack.client("lambda").invoke(
        FunctionName=stack.function_name(logical_id), Payload=json.dumps(event).encode()
    )
    return json.loads(resp["Payload"].read()), resp.get("FunctionError")


def ok(stack: DeployedStack, logical_id: str, event: dict[str, Any]) -> Any:
    payload, error = call(stack, logical_id, event)
    assert error is None, payload
    return payload


def test_every_restriction_is_on_by_default() -> None:
    semantics = lambda_runtime.LambdaSemantics()
    assert (semantics.freeze, semantics.read_only_code, semantics.private_tmp) == (True, True, True)
    assert (semantics.timeout, semantics.memory, semantics.no_redis, semantics.host_env) == (True, True, True, ())


def test_warm_reuse_keeps_module_state_in_one_environment(stack: DeployedStack) -> None:
    first = ok(stack, "ProbeFunction", {"action": "state"})
    second = ok(stack, "ProbeFunction", {"action": "state"})

    assert second["pid"] == first["pid"]
    assert second["invocations"] == first["invocations"] + 1
    assert first["pid"] != os.getpid()  # a worker process, not this one


def test_a_makefile_layer_is_built_as_sam_build_does_and_loaded_from_its_bytecode(stack: DeployedStack) -> None:
    origin = ok(stack, "ProbeFunction", {"action": "layer"})
    built = layer_build.cache_root()
    assert Path(origin["file"]).is_relative_to(built), origin  # the build's artifacts, not the source tree
    assert not Path(origin["file"]).is_relative_to(APP.parent)
    assert Path(origin["cached"]).is_file() and Path(origin["cached"]).is_relative_to(built)
    assert origin["loaded_from"] == "bytecode"  # the build's .pyc, not a compile of its (changed) source


def test_environment_is_exactly_the_functions(stack: DeployedStack) -> None:
    out = ok(stack, "ProbeFunction", {"action": "env"})
    env = out["env"]

    assert env["PROBE"] == "one" and env["RENDEZVOUS_TABLE"] == "lrt-rendezvous"
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "lrt-ProbeFunction"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256"
    assert env["AWS_ENDPOINT_URL"] == stack.endpoint_url
    assert env["LAMBDA_TASK_ROOT"] == out["cwd"] == str(CODE_DIR)
    assert env["TMPDIR"] == out["tempdir"] == "/tmp"
    # Credentials of the function's role, from STS AssumeRole, not the caller's.
    assert env["AWS_SESSION_TOKEN"] and env["AWS_ACCESS_KEY_ID"] != os.environ.get("AWS_ACCESS_KEY_ID")
    # Nothing from the machine that deployed it.
    for name in ("CACHEVAULT_HOME", "PYTEST_CURRENT_TEST", "HOME", "VIRTUAL_ENV"):
        assert name not in env


def test_a_thread_left_running_makes_no_progress_after_return(stack: DeployedStack) -> None:
    started = ok(stack, "ProbeFunction", {"action": "start_ticker"})
    # Real work elsewhere while the environment is frozen: invocations of another function.
    for _ in range(5):
        ok(stack, "OtherProbeFunction", {"action": "state"})
    after = ok(stack, "ProbeFunction", {"action": "ticks"})

    frozen_for = after["now"] - started["returned_at"]
    assert frozen_for > 0.05  # the ticker (every 5 ms) would have ticked 10 times
    ticks_while_frozen = [t for t in after["ticks"] if started["returned_at"] + 0.01 < t < after["now"] - 0.01]
    # Thawed for this invocation, it may tick once or twice before the handler reads.
    assert len(ticks_while_frozen) <= 2, (frozen_for, len(ticks_while_frozen))


def test_a_write_outside_tmp_fails(stack: DeployedStack) -> None:
    outside = ROOT / "written-by-a-lambda.txt"
    for path in (str(CODE_DIR / "new.txt"), "app.py", str(outside)):
        assert ok(stack, "ProbeFunction", {"action": "write", "path": path}) == {"written": False, "errno": "EROFS"}
    assert not (CODE_DIR / "new.txt").exists() and not outside.exists()
    assert ok(stack, "ProbeFunction", {"action": "write", "path": "/tmp/fine.txt"}) == {"written": True}


def test_tmp_is_private_to_each_function(stack: DeployedStack) -> None:
    ok(stack, "ProbeFunction", {"action": "tmp_put", "value": "one"})
    assert ok(stack, "OtherProbeFunction", {"action": "tmp_get"}) == {"value": None}
    ok(stack, "OtherProbeFunction", {"action": "tmp_put", "value": "other"})
    assert ok(stack, "ProbeFunction", {"action": "tmp_get"}) == {"value": "one"}


@pytest.mark.slow
def test_tmp_beyond_ephemeral_storage_fails_with_enospc(stack: DeployedStack) -> None:
    default = ok(stack, "ProbeFunction", {"action": "fill_tmp"})
    bigger = ok(stack, "OtherProbeFunction", {"action": "fill_tmp"})  # EphemeralStorage 600

    assert default["errno"] == "ENOSPC" and 496 <= default["written_mb"] <= 512, default
    assert bigger["errno"] == "ENOSPC" and 584 <= bigger["written_mb"] <= 600, bigger


def test_two_iterations_of_one_map_run_at_the_same_time(stack: DeployedStack) -> None:
    sfn = stack.client("stepfunctions")
    meet = {"action": "meet", "rendezvous": "map-1", "expected": 2, "wait_s": 30}
    arn = sfn.start_execution(
        stateMachineArn=stack.state_machines["FanOutStateMachine"],
        name="fan-out",
        input=json.dumps({"items": [meet, meet]}),
    )["executionArn"]

    desc = wait_execution(sfn, arn, timeout_s=60)

    assert desc["status"] == "SUCCEEDED", desc
    out = json.loads(desc["output"])
    # Each iteration waited for the other: only possible if both ran at once, in two environments.
    assert [o["met"] for o in out] == [True, True]
    assert out[0]["pid"] != out[1]["pid"]


def test_a_timed_out_invocation_is_caught_as_sandbox_timedout(stack: DeployedStack) -> None:
    sfn = stack.client("stepfunctions")
    arn = sfn.start_execution(
        stateMachineArn=stack.state_machines["TimeoutStateMachine"],
        name="too-slow",
        input=json.dumps({"action": "sleep", "seconds": 30}),
    )["executionArn"]

    desc = wait_execution(sfn, arn, timeout_s=30)

    assert desc["status"] == "SUCCEEDED", desc
    error = json.loads(desc["output"])["error"]
    assert error["Error"] == "Sandbox.Timedout"
    cause = json.loads(error["Cause"])
    assert cause["errorType"] == "Sandbox.Timedout"
    assert cause["errorMessage"].startswith("RequestId: ")
    assert cause["errorMessage"].endswith("Error: Task timed out after 1.00 seconds")
    entered = [e["stateEnteredEventDetails"]["name"] for e in history(sfn, arn) if "stateEnteredEventDetails" in e]
    assert entered == ["Slow", "TimedOut"]
    # The environment was killed; the next invocation starts a new one and works.
    assert ok(stack, "ShortFunction", {"action": "state"})["invocations"] == 1


def test_memory_overrun_kills_the_environment(stack: DeployedStack) -> None:
    payload, error = call(stack, "SmallFunction", {"action": "alloc", "mb": 256, "hold_s": 15})

    assert error == "Unhandled"
    assert payload["errorType"] == "Runtime.OutOfMemory", payload
    assert "Runtime exited with error: signal: killed" in payload["errorMessage"]
    assert ok(stack, "SmallFunction", {"action": "alloc", "mb": 16, "hold_s": 0}) == {"allocated": 16 << 20}


def test_large_events_and_results_cross_the_pipes_whole(stack: DeployedStack) -> None:
    big = "x" * (5 << 20)  # far beyond a pipe's 64 KiB buffer, under Lambda's 6 MB payload

    assert ok(stack, "ProbeFunction", {"action": "echo", "blob": big}) == {"echo": {"action": "echo", "blob": big}}


def test_an_unhandled_exception_has_lambdas_error_shape(stack: DeployedStack) -> None:
    payload, error = call(stack, "ProbeFunction", {"action": "raise", "message": "no such thing"})

    assert error == "Unhandled"
    assert (payload["errorType"], payload["errorMessage"]) == ("LookupError", "no such thing")
    assert "probe/app.py" in payload["stackTrace"][0]


def test_redis_server_is_not_found_from_a_handler(stack: DeployedStack) -> None:
    out = ok(stack, "ProbeFunction", {"action": "redis"})

    assert out["which"] == {"redis-server": None, "redis-cli": None, "valkey-server": None}
    assert out["exec"] == {
        "redis-server": "FileNotFoundError: redis-server",
        "/usr/bin/redis-server": "FileNotFoundError: /usr/bin/redis-server",
        "redis-cli": "FileNotFoundError: redis-cli",
    }
    assert out["shell"] == "other tools run"  # only Redis is gone from PATH


def test_audit_isolation_refuses_writes_and_shared_tmp(stack: DeployedStack) -> None:
    """Where no mount namespace can be made, the worker's audit hook is the fence."""
    name = stack.function_name("OtherProbeFunction")
    lambda_runtime.RUNTIME.set_semantics(name, lambda_runtime.LambdaSemantics(isolation="audit"))
    try:
        env = ok(stack, "OtherProbeFunction", {"action": "env"})
        assert env["tempdir"] != "/tmp" and env["env"]["TMPDIR"] == env["tempdir"]
        for path in (str(CODE_DIR / "new.txt"), "/tmp/shared.txt"):
            assert ok(stack, "OtherProbeFunction", {"action": "write", "path": path}) == {
                "written": False,
                "errno": "EROFS",
            }
        assert ok(stack, "OtherProbeFunction", {"action": "write", "path": env["tempdir"] + "/f"}) == {"written": True}
        assert {e.isolation for e in lambda_runtime.RUNTIME.environments(name)} == {"audit"}
    finally:
        lambda_runtime.RUNTIME.set_semantics(name, lambda_runtime.LambdaSemantics())


def test_a_new_environment_forks_from_the_zygote_and_still_has_its_own_init(stack: DeployedStack) -> None:
    """The interpreter and third-party imports come from the zygote; the sandbox, the
    handler's import and the Init Duration stay per environment, as on Lambda."""
    name = stack.function_name("ProbeFunction")
    lambda_runtime.RUNTIME.set_semantics(name, lambda_runtime.LambdaSemantics())  # every environment ends: cold
    resp = stack.client("lambda").invoke(FunctionName=name, Payload=b'{"action": "state"}', LogType="Tail")
    first = json.loads(resp["Payload"].read())
    report = base64.b64decode(resp["LogResult"]).decode()
    assert first["invocations"] == 1  # the handler module was imported in this environment, fresh
    assert "\tInit Duration: " in report  # the cold invocation reports its init, a warm one does not
    warm = stack.client("lambda").invoke(FunctionName=name, Payload=b'{"action": "state"}', LogType="Tail")
    assert json.loads(warm["Payload"].read())["pid"] == first["pid"]
    assert "Init Duration" not in base64.b64decode(warm["LogResult"]).decode()
    (env,) = lambda_runtime.RUNTIME.environments(name)
    assert env.forked and env.pid == first["pid"]
    assert env.isolation in ("namespace", "audit")  # the sandbox was built in the fork
    zygote_pid = int(Path(f"/proc/{first['pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert zygote_pid != os.getpid()  # the parent is the zygote, not the runtime
    zygote_env = Path(f"/proc/{zygote_pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in zygote_env if v.startswith((b"AWS_ACCESS_KEY_ID=", b"AWS_SESSION_TOKEN=", b"PROBE="))]
    # A variable a preloaded module reads at import that differs from the zygote's: a fresh process.
    zygote = lambda_runtime.RUNTIME._zygotes["python3.11"]
    assert "POWERTOOLS_DEBUG" in zygote.import_env
    assert not zygote.accepts({**dict(env.setup.env), "POWERTOOLS_DEBUG": "true"})


def test_environments_end_with_the_runtime(stack: DeployedStack) -> None:
    name = stack.function_name("ProbeFunction")
    pid = ok(stack, "ProbeFunction", {"action": "state"})["pid"]
    assert pid in {e.pid for e in lambda_runtime.RUNTIME.environments(name)}
    # Frozen while idle (SIGSTOP is delivered asynchronously: wait for the state).
    wait_until(lambda: "State:\tT (stopped)" in Path(f"/proc/{pid}/status").read_text(), 10, "a frozen worker")

    lambda_runtime.RUNTIME.unregister(name)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, "the worker to end")

