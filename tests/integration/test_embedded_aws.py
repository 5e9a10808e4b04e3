"""The embedded AWS end to end: a SAM app deployed into moto, its real handlers run.

The fixture app (tests/fixtures/samapp) has a handler that raises ``FlakyError`` until
a DynamoDB counter says it has failed enough, a state machine that retries it and
catches a permanent error into a fallback, a Map over another handler, schedules and an
S3 notification. Everything runs in moto's threaded server on a free loopback port, the
handlers in worker processes that call it back over HTTP.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cachevault_tools.local import lambda_runtime
from cachevault_tools.local.cfn_intrinsics import load_template
from cachevault_tools.local.deployer import DeployedStack, deploy
from cachevault_tools.local.embedded import ServerAWS
from cachevault_tools.local.redis_process import free_port
from cachevault_tools.local.schedules import ScheduleTicker, find_schedule, fire_schedule, next_fire

ROOT = Path(__file__).resolve().parents[2]
SAMAPP = ROOT / "tests" / "fixtures" / "samapp" / "template.yaml"
PRODUCT_TEMPLATE = ROOT / "template.yaml"
POLL_TIMEOUT_S = 30.0


def wait_execution(sfn: Any, arn: str, timeout_s: float = POLL_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        desc = sfn.describe_execution(executionArn=arn)
        if desc["status"] != "RUNNING":
            return desc
        time.sleep(0.05)
    raise AssertionError(f"execution {arn} still RUNNING after {timeout_s}s")


def history(sfn: Any, arn: str) -> list[dict[str, Any]]:
    return sfn.get_execution_history(executionArn=arn, maxResults=1000)["events"]


def invoke(stack: DeployedStack, logical_id: str, event: Any) -> tuple[Any, str | None]:
    resp = stack.client("lambda").invoke(
        FunctionName=stack.function_name(logical_id), Payload=json.dumps(event).encode()
    )
    return json.loads(resp["Payload"].read()), resp.get("FunctionError")


@pytest.fixture(scope="class")
def aws() -> Iterator[ServerAWS]:
    with ServerAWS(port=free_port()) as embedded:
        yield embedded


@pytest.fixture(scope="class")
def stack(aws: ServerAWS) -> DeployedStack:
    return aws.deploy(SAMAPP, stack_name="samapp")


class TestDeployedApp:
    """One server and one deployed stack shared by the tests of this class."""

    # --- deploy -------------------------------------------------------------------------

    def test_deploy_creates_the_template_resources(self, stack: DeployedStack) -> None:
        lam, ddb, s3 = stack.client("lambda"), stack.client("dynamodb"), stack.client("s3")

        assert set(stack.functions) == {"FlakyFunction", "EchoFunction", "UnpermittedFunction"}
        flaky = lam.get_function(FunctionName="samapp-FlakyFunction")["Configuration"]
        # Globals merged with the function's own: env, timeout, memory, layer
        assert flaky["Environment"]["Variables"] == {
            "COUNTER_TABLE": "samapp-counters",
            "ARTIFACTS_BUCKET": "samapp-artifacts-123456789012-us-east-1",
            "STAGE": "test",
            "GREETING": "hello-from-flaky",
        }
        assert (flaky["Timeout"], flaky["MemorySize"], flaky["Runtime"]) == (10, 256, "python3.11")
        assert [layer["Arn"] for layer in flaky["Layers"]] == [stack.layers["SharedLayer"]]
        assert lam.get_function(FunctionName="samapp-EchoFunction")["Configuration"]["Timeout"] == 5

        table = ddb.describe_table(TableName="samapp-counters")["Table"]
        assert table["GlobalSecondaryIndexes"][0]["IndexName"] == "by-kind"
        ttl = ddb.describe_time_to_live(TableName="samapp-counters")["TimeToLiveDescription"]
        assert (ttl["TimeToLiveStatus"], ttl["AttributeName"]) == ("ENABLED", "expires_at")

        bucket = stack.buckets["ArtifactsBucket"]
        assert bucket == "samapp-artifacts-123456789012-us-east-1"
        assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Suspended"  # !If IsProd false

        sfn = stack.client("stepfunctions")
        definition = sfn.describe_state_machine(stateMachineArn=stack.state_machines["RetryStateMachine"])["definition"]
        assert stack.functions["FlakyFunction"].arn in definition and "${" not in definition

        assert stack.outputs == {
            "RetryStateMachineArn": stack.state_machines["RetryStateMachine"],
            "ArtifactsBucketName": bucket,
            "FlakyArn": stack.functions["FlakyFunction"].arn,
            "Mode": "testing",
        }
        assert "Alerts" in stack.skipped  # AWS::SNS::Topic: noted, not fatal
        rules = stack.client("events").list_rules()["Rules"]
        assert {"samapp-RetryStateMachine-Tick"} <= {r["Name"] for r in rules}

    def test_roles_and_policies_are_the_translators(self, stack: DeployedStack) -> None:
        """The SAM translator's roles land in IAM as CloudFormation would create them."""
        iam = stack.client("iam")
        translated = stack.cloudformation["Resources"]
        flaky_role = translated["FlakyFunctionRole"]["Properties"]
        role_name = stack.roles["FlakyFunctionRole"].rsplit("/", 1)[1]
        assert stack.functions["FlakyFunction"].role_arn == stack.roles["FlakyFunctionRole"]

        attached = {p["PolicyArn"] for p in iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]}
        assert attached == set(flaky_role["ManagedPolicyArns"])  # basic execution + X-Ray (Tracing: Active)
        [inline] = iam.list_role_policies(RoleName=role_name)["PolicyNames"]
        assert inline == flaky_role["Policies"][0]["PolicyName"]
        document = iam.get_role_policy(RoleName=role_name, PolicyName=inline)["PolicyDocument"]
        [statement] = document["Statement"]
        assert "dynamodb:PutItem" in statement["Action"]  # DynamoDBCrudPolicy, expanded by the translator
        table_arn = "arn:aws:dynamodb:us-east-1:123456789012:table/samapp-counters"
        assert statement["Resource"] == [table_arn, f"{table_arn}/index/*"]
        trust = iam.get_role(RoleName=role_name)["Role"]["AssumeRolePolicyDocument"]
        assert trust["Statement"][0]["Principal"] == {"Service": ["lambda.amazonaws.com"]}

        # A state machine role holds exactly its LambdaInvokePolicy statements.
        retry_role = stack.state_machine_roles["RetryStateMachine"].rsplit("/", 1)[1]
        names = iam.list_role_policies(RoleName=retry_role)["PolicyNames"]
        assert len(names) == 2  # FlakyFunction, EchoFunction
        invoke = iam.get_role_policy(RoleName=retry_role, PolicyName=names[0])["PolicyDocument"]["Statement"]
        assert invoke[0]["Action"] == ["lambda:InvokeFunction"]
        assert invoke[0]["Resource"] == stack.functions["FlakyFunction"].arn + "*"
        unpermitted = stack.functions["UnpermittedFunction"].role_arn.rsplit("/", 1)[1]
        assert iam.list_role_policies(RoleName=unpermitted)["PolicyNames"] == []
        # bucket -> permission -> function -> bucket (ARTIFACTS_BUCKET in Globals): sam deploy fails on it
        assert {"ArtifactsBucket", "EchoFunction", "EchoFunctionUploadsPermission"} <= set(stack.cloudformation_cycle)

    def test_redeploy_updates_in_place(self, aws: ServerAWS, stack: DeployedStack) -> None:
        again = aws.deploy(SAMAPP, stack_name="samapp")
        assert again.state_machines == stack.state_machines
        assert {k: f.arn for k, f in again.functions.items()} == {k: f.arn for k, f in stack.functions.items()}
        assert again.layers == stack.layers
        names = [f["FunctionName"] for f in stack.client("lambda").list_functions()["Functions"]]
        assert sorted(n for n in names if n.startswith("samapp-")) == [
            "samapp-EchoFunction",
            "samapp-FlakyFunction",
            "samapp-UnpermittedFunction",
        ]

    def test_parameter_override_changes_conditions(self, aws: ServerAWS) -> None:
        prod = aws.deploy(SAMAPP, stack_name="samprod", parameter_overrides={"Stage": "prod"})
        assert prod.outputs["Mode"] == "production"
        assert prod.client("s3").get_bucket_versioning(Bucket=prod.buckets["ArtifactsBucket"])["Status"] == "Enabled"
        with pytest.raises(ValueError, match="is not one of"):
            aws.deploy(SAMAPP, stack_name="sambad", parameter_overrides={"Stage": "qa"})

    # --- Step Functions running the real handlers -----------------------------------------

    def test_retry_on_the_handlers_custom_error(self, stack: DeployedStack) -> None:
        sfn = stack.client("stepfunctions")
        arn = sfn.start_execution(
            stateMachineArn=stack.state_machines["RetryStateMachine"],
            name="retry-once",
            input=json.dumps({"key": "retry-once", "fail_times": 1}),
        )["executionArn"]

        desc = wait_execution(sfn, arn)

        assert desc["status"] == "SUCCEEDED", desc
        assert json.loads(desc["output"]) == {
            "key": "retry-once",
            "attempts": 2,
            "greeting": "hello-from-flaky",
            "shared": "shared:test",  # imported from the layer, reading the function's env
            "function_name": "samapp-FlakyFunction",
        }
        events = [e for e in history(sfn, arn) if e["type"].startswith("LambdaFunction")]
        outcomes = [e["type"] for e in events if e["type"] in ("LambdaFunctionFailed", "LambdaFunctionSucceeded")]
        assert outcomes == ["LambdaFunctionFailed", "LambdaFunctionSucceeded"]
        failed = next(e for e in events if e["type"] == "LambdaFunctionFailed")["lambdaFunctionFailedEventDetails"]
        assert failed["error"] == "FlakyError"
        cause = json.loads(failed["cause"])
        assert cause["errorMessage"] == "attempt 1 failed"
        assert "flaky/app.py" in cause["stackTrace"][0]
        attempts = stack.client("dynamodb").get_item(TableName="samapp-counters", Key={"pk": {"S": "retry-once"}})
        assert attempts["Item"]["attempts"]["N"] == "2"

    def test_retries_exhausted_fail_the_execution_with_the_error_name(self, stack: DeployedStack) -> None:
        sfn = stack.client("stepfunctions")
        arn = sfn.start_execution(
            stateMachineArn=stack.state_machines["RetryStateMachine"],
            name="always-flaky",
            input=json.dumps({"key": "always-flaky", "fail_times": 99}),
        )["executionArn"]

        desc = wait_execution(sfn, arn)

        assert desc["status"] == "FAILED"
        assert desc["error"] == "FlakyError"
        failures = [e for e in history(sfn, arn) if e["type"] == "LambdaFunctionFailed"]
        assert len(failures) == 4  # first try + MaxAttempts 3

    def test_catch_routes_a_permanent_error_to_the_fallback(self, stack: DeployedStack) -> None:
        sfn = stack.client("stepfunctions")
        arn = sfn.start_execution(
            stateMachineArn=stack.state_machines["RetryStateMachine"],
            name="permanent",
            input=json.dumps({"key": "perm", "permanent": True}),
        )["executionArn"]

        desc = wait_execution(sfn, arn)

        assert desc["status"] == "SUCCEEDED", desc
        fallback = json.loads(desc["output"])["fallback"]
        assert fallback["function_name"] == "samapp-EchoFunction"
        assert fallback["echo"]["key"] == "perm"
        assert fallback["echo"]["error"]["Error"] == "PermanentError"
        assert json.loads(fallback["echo"]["error"]["Cause"])["errorMessage"] == "cannot ever process perm"
        entered = [e["stateEnteredEventDetails"]["name"] for e in history(sfn, arn) if "stateEnteredEventDetails" in e]
        assert entered == ["Flaky", "Fallback"]

    def test_a_function_without_the_permission_is_denied_through_the_state_machine(
        self, stack: DeployedStack
    ) -> None:
        """IAM is enforced: the handler runs with its role's credentials, which lack DynamoDB."""
        sfn = stack.client("stepfunctions")
        arn = sfn.start_execution(
            stateMachineArn=stack.state_machines["DeniedStateMachine"], name="denied", input=json.dumps({"key": "d"})
        )["executionArn"]
        desc = wait_execution(sfn, arn)
        assert desc["status"] == "SUCCEEDED", desc  # the Catch recorded the error
        output = json.loads(desc["output"])
        assert "error" in output, output
        error = output["error"]
        assert error["Error"] == "ClientError"
        cause = json.loads(error["Cause"])["errorMessage"]
        assert "AccessDenied" in cause and "assumed-role/samapp-UnpermittedFunctionRole/" in cause
        assert "dynamodb:UpdateItem" in cause
        # The same call with the permission (FlakyFunction's role) is allowed.
        payload, function_error = invoke(stack, "FlakyFunction", {"key": "allowed"})
        assert function_error is None and payload["attempts"] == 1

    def test_map_runs_iterations_of_one_function_in_parallel(self, stack: DeployedStack) -> None:
        lam, sfn = stack.client("lambda"), stack.client("stepfunctions")
        name = stack.function_name("EchoFunction")
        original = lam.get_function_configuration(FunctionName=name)
        items = 4
        # Every iteration waits at a barrier until all have arrived: run one after another,
        # the first would wait alone until its timeout. No timing luck either way.
        with socket.create_server(("127.0.0.1", 0)) as server:
            barrier = f"127.0.0.1:{server.getsockname()[1]}"
            variables = {**original["Environment"]["Variables"], "BARRIER_ADDRESS": barrier}
            lam.update_function_configuration(FunctionName=name, Timeout=60, Environment={"Variables": variables})
            arrived: list[socket.socket] = []
            opener = threading.Thread(target=_open_barrier, args=(server, items, arrived), daemon=True)
            opener.start()
            try:
                arn = sfn.start_execution(
                    stateMachineArn=stack.state_machines["MapStateMachine"],
                    name="fan-out",
                    input=json.dumps({"items": [{"i": i} for i in range(items)]}),
                )["executionArn"]
                desc = wait_execution(sfn, arn)
            finally:
                lam.update_function_configuration(
                    FunctionName=name, Timeout=original["Timeout"], Environment=original["Environment"]
                )
                opener.join(timeout=70)
                for conn in arrived:
                    conn.close()

        assert desc["status"] == "SUCCEEDED", desc
        out = json.loads(desc["output"])
        assert [o["echo"] for o in out] == [{"i": i} for i in range(items)]
        assert {o["env_function_name"] for o in out} == {name}
        assert len(arrived) == items and all(o["barrier_passed"] for o in out)

    # --- direct invocation ----------------------------------------------------------------

    def test_direct_invoke_runs_the_handler_with_a_lambda_context(self, stack: DeployedStack) -> None:
        payload, error = invoke(stack, "EchoFunction", {"hello": "world"})

        assert error is None
        assert payload["echo"] == {"hello": "world"}
        assert payload["function_name"] == payload["env_function_name"] == "samapp-EchoFunction"
        assert payload["arn"] == stack.functions["EchoFunction"].arn
        assert payload["memory"] == 256
        assert 0 < payload["remaining_ms"] <= 5000
        assert payload["stage"] == "test"

    def test_direct_invoke_of_a_raising_handler_is_an_unhandled_error(self, stack: DeployedStack) -> None:
        payload, error = invoke(stack, "FlakyFunction", {"key": "direct", "permanent": True})

        assert error == "Unhandled"
        assert payload["errorType"] == "PermanentError"
        assert payload["errorMessage"] == "cannot ever process direct"
        assert payload["stackTrace"]

    def test_a_handler_running_past_its_timeout_is_reported_as_timed_out(self, stack: DeployedStack) -> None:
        lam = stack.client("lambda")
        name = stack.function_name("EchoFunction")
        original = lam.get_function_configuration(FunctionName=name)
        lam.update_function_configuration(
            FunctionName=name,
            Timeout=1,
            Environment={"Variables": {**original["Environment"]["Variables"], "SLEEP_SECONDS": "1.1"}},
        )
        try:
            payload, error = invoke(stack, "EchoFunction", {})
        finally:
            lam.update_function_configuration(
                FunctionName=name, Timeout=original["Timeout"], Environment=original["Environment"]
            )
        assert error == "Unhandled"
        assert payload["errorType"] == "Sandbox.Timedout"
        assert "timed out after 1.00 seconds" in payload["errorMessage"]

    def test_concurrent_invocations_each_see_their_own_environment(self, stack: DeployedStack) -> None:
        def call(i: int) -> tuple[str, Any]:
            if i % 2:
                return "echo", invoke(stack, "EchoFunction", {"i": i})[0]
            return "flaky", invoke(stack, "FlakyFunction", {"key": f"conc-{i}"})[0]

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(call, range(16), timeout=POLL_TIMEOUT_S))

        for kind, payload in results:
            if kind == "echo":
                assert payload.get("env_function_name") == "samapp-EchoFunction", payload
            else:
                assert payload["greeting"] == "hello-from-flaky", payload
                assert payload["attempts"] == 1

    def test_s3_notification_invokes_the_function(self, stack: DeployedStack) -> None:
        s3 = stack.client("s3")
        name = stack.function_name("EchoFunction")
        before = lambda_runtime.RUNTIME.invocations.get(name, 0)
        s3.put_object(Bucket=stack.buckets["ArtifactsBucket"], Key="incoming/a.txt", Body=b"x")
        s3.put_object(Bucket=stack.buckets["ArtifactsBucket"], Key="other/b.txt", Body=b"x")  # filtered out
        assert lambda_runtime.RUNTIME.invocations.get(name, 0) - before == 1

    # --- schedules ------------------------------------------------------------------------

    def test_fire_a_declared_schedule_starts_the_state_machine(self, stack: DeployedStack) -> None:
        sfn = stack.client("stepfunctions")
        fired = fire_schedule(stack, "Tick")

        assert fired.schedule.target_arn == stack.state_machines["RetryStateMachine"]
        assert fired.execution_arn is not None
        desc = wait_execution(sfn, fired.execution_arn)
        assert desc["status"] == "SUCCEEDED", desc
        assert json.loads(desc["output"])["key"] == "scheduled"  # the rule's Input

    def test_fire_a_schedule_targeting_a_function(self, stack: DeployedStack) -> None:
        fired = fire_schedule(stack, "samapp-EchoFunction-EveryFive")
        assert fired.function_error is None
        assert fired.payload["echo"] == {"source": "every-five"}
        assert fired.payload["function_name"] == "samapp-EchoFunction"
        with pytest.raises(KeyError, match="no schedule"):
            find_schedule(stack, "NoSuchSchedule")

    def test_ticker_fires_due_schedules_on_an_injected_clock(self, stack: DeployedStack) -> None:
        now = [datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)]
        ticker = ScheduleTicker(stack, clock=lambda: now[0], interval_s=0.01)
        assert ticker.due()["samapp-RetryStateMachine-Tick"] == datetime(2026, 1, 1, 12, 1, 30, tzinfo=UTC)
        assert ticker.due()["samapp-EchoFunction-EveryFive"] == datetime(2026, 1, 1, 12, 5, tzinfo=UTC)

        assert ticker.tick() == []  # nothing due yet
        now[0] += timedelta(seconds=61)
        fired = ticker.tick()
        assert [f.schedule.name for f in fired] == ["samapp-RetryStateMachine-Tick"]
        assert ticker.tick() == []  # once per period, not once per tick
        assert wait_execution(stack.client("stepfunctions"), fired[0].execution_arn)["status"] == "SUCCEEDED"

        # The thread: advance past the 12:05 cron and the next rate firing, let it tick.
        now[0] = datetime(2026, 1, 1, 12, 5, 10, tzinfo=UTC)
        ticker.start()
        try:
            deadline = time.monotonic() + POLL_TIMEOUT_S
            while len(ticker.fired) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            ticker.stop()
        assert sorted(f.schedule.name for f in ticker.fired[1:]) == [
            "samapp-EchoFunction-EveryFive",
            "samapp-RetryStateMachine-Tick",
        ]
        assert ticker.errors == []
        for result in ticker.fired:
            if result.execution_arn:
                wait_execution(stack.client("stepfunctions"), result.execution_arn)

    @pytest.mark.parametrize(
        ("expression", "after", "expected"),
        [
            ("rate(5 minutes)", "2026-01-01T00:00:00", "2026-01-01T00:05:00"),
            ("rate(1 day)", "2026-01-01T10:00:00", "2026-01-02T10:00:00"),
            ("cron(0 3 * * ? *)", "2026-01-01T03:00:00", "2026-01-02T03:00:00"),
            ("cron(15,45 */6 ? * MON-FRI *)", "2026-01-02T19:00:00", "2026-01-05T00:15:00"),  # Fri -> Mon
            ("cron(0 0 1 JAN ? 2027)", "2026-06-01T00:00:00", "2027-01-01T00:00:00"),
            ("at(2026-03-01T08:30:00)", "2026-01-01T00:00:00", "2026-03-01T08:30:00"),
        ],
    )
    def test_next_fire(self, expression: str, after: str, expected: str) -> None:
        got = next_fire(expression, datetime.fromisoformat(after).replace(tzinfo=UTC))
        assert got == datetime.fromisoformat(expected).replace(tzinfo=UTC)

    def test_next_fire_rejects_what_it_cannot_honour(self) -> None:
        now = datetime(2026, 1, 1, tzinfo=UTC)
        assert next_fire("at(2025-01-01T00:00:00)", now) is None
        for bad in ("cron(0 0 L * ? *)", "rate(2 weeks)", "cron(0 0 * *)"):
            with pytest.raises(ValueError):
                next_fire(bad, now)

    # --- the product template -------------------------------------------------------------

    def test_product_template_deploys(self, aws: ServerAWS) -> None:
        if not PRODUCT_TEMPLATE.exists():
            pytest.fail(f"{PRODUCT_TEMPLATE} is missing: the product SAM template must exist")
        template = load_template(PRODUCT_TEMPLATE)
        declared = {lid for lid, r in template["Resources"].items() if r["Type"] == "AWS::Serverless::Function"}

        stack = aws.deploy(PRODUCT_TEMPLATE, stack_name="cvproduct")

        assert set(stack.functions) == declared
        registered = lambda_runtime.RUNTIME.registered()
        for info in stack.functions.values():
            assert info.code_dir is not None and (info.code_dir / "app.py").is_file(), info
            assert registered[info.name].code_dir == info.code_dir
        sfn = stack.client("stepfunctions")
        for arn in stack.state_machines.values():
            definition = sfn.describe_state_machine(stateMachineArn=arn)["definition"]
            assert "${" not in definition  # every DefinitionSubstitution applied
            json.loads(definition)
        for bucket in stack.buckets.values():
            stack.client("s3").head_bucket(Bucket=bucket)
        for table in stack.tables.values():
            assert stack.client("dynamodb").describe_table(TableName=table)["Table"]["TableStatus"] == "ACTIVE"


# --- server mode ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_server_mode_runs_handlers_that_call_back_into_it(tmp_path: Path) -> None:
    port = _free_port()
    server = ServerAWS(port=port).start()
    try:
        stack = deploy(SAMAPP, stack_name="samsrv", session=server.session(), endpoint_url=server.endpoint_url)
        assert stack.endpoint_url == f"http://127.0.0.1:{port}"
        sfn = stack.client("stepfunctions")
        arn = sfn.start_execution(
            stateMachineArn=stack.state_machines["RetryStateMachine"],
            name="srv-retry",
            input=json.dumps({"key": "srv", "fail_times": 1}),
        )["executionArn"]
        desc = wait_execution(sfn, arn)
        # The handler's DynamoDB calls went back over HTTP to the same (threaded) server.
        assert desc["status"] == "SUCCEEDED", desc
        assert json.loads(desc["output"])["attempts"] == 2
        item = stack.client("dynamodb").get_item(TableName="samsrv-counters", Key={"pk": {"S": "srv"}})
        assert item["Item"]["attempts"]["N"] == "2"
        payload, error = invoke(stack, "FlakyFunction", {"key": "x", "permanent": True})
        assert (error, payload["errorType"]) == ("Unhandled", "PermanentError")
    finally:
        server.stop()
    with socket.socket() as sock, pytest.raises(OSError):
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))


def _open_barrier(server: socket.socket, count: int, arrived: list[socket.socket]) -> None:
    """Accept ``count`` invocations (each sends b"arrived"), then let them all go."""
    server.settimeout(60)
    try:
        while len(arrived) < count:
            conn, _ = server.accept()
            conn.settimeout(60)
            if conn.recv(7) == b"arrived":
                arrived.append(conn)
    except OSError:
        return  # timed out: the test's assertion on ``arrived`` says what was missing
    for conn in arrived:
        conn.sendall(b"go")
