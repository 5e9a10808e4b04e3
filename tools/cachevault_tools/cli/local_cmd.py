"""cachevault local up|down|status: the embedded AWS as a local background service."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from cachevault.core import stack as stack_info
from cachevault.core.settings import Settings

from cachevault_tools.cli import context
from cachevault_tools.cli.output import add_json_flag, emit
from cachevault_tools.local.redis_process import process_alive


def register(sub: Any) -> None:
    local = sub.add_parser("local", help="the embedded AWS (moto) with template.yaml deployed, on 127.0.0.1")
    verbs = local.add_subparsers(dest="verb", required=True, metavar="VERB")
    up = verbs.add_parser("up", help="start the embedded AWS in the background and deploy template.yaml")
    up.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get(PORT_ENV) or DEFAULT_PORT),
        help=f"loopback port (default {DEFAULT_PORT}, or ${PORT_ENV})",
    )
    add_json_flag(up)
    up.set_defaults(func=cmd_up, operation="LocalUp")
    env = verbs.add_parser(
        "env",
        help="the environment for the aws CLI and boto3 against the running embedded AWS",
        description='in a shell: eval "$(cachevault local env)"',
    )
    add_json_flag(env)
    env.set_defaults(func=cmd_env, operation="LocalEnv")
    down = verbs.add_parser(
        "down", help="stop the embedded AWS and every local cache node (their data is kept for the next up)"
    )
    add_json_flag(down)
    down.set_defaults(func=cmd_down, operation="LocalDown")
    status = verbs.add_parser("status", help="is it running, where, and which local caches exist")
    add_json_flag(status)
    status.set_defaults(func=cmd_status, operation="LocalStatus")
    invoke = verbs.add_parser("invoke", help="run one function with an event, like `sam local invoke`")
    invoke.add_argument("function", metavar="FUNCTION", help="logical id (SnapshotPreflightFunction) or functions/ dir")
    invoke.add_argument("--event", "-e", type=Path, help="JSON event file (e.g. events/snapshot_preflight.json)")
    add_json_flag(invoke)  # the result is JSON either way; this makes errors JSON too
    invoke.set_defaults(func=cmd_invoke, operation="Invoke")
    fire = verbs.add_parser("fire-schedule", help="deliver one firing of a template schedule to its target now")
    fire.add_argument(
        "name", help="rule name, or a unique part of it (e.g. SchedulerFunction or SchedulerFunction-Tick)"
    )
    fire.add_argument("--time", default=None, help="the event's time (ISO 8601, UTC if no offset; default now)")
    add_json_flag(fire)
    fire.set_defaults(func=cmd_fire_schedule, operation="FireSchedule")


def cmd_up(args: argparse.Namespace) -> int:
    info = context.local_up(args.port)
    env = user_environment(info)
    schedules = _schedule_names(info)
    human = "\n".join(
        [
            f"embedded AWS up on {info.endpoint_url} (pid {info.pid})",
            f"snapshot bucket: {info.bucket}",
            f"schedules: {', '.join(schedules) or '(none)'}",
            'for the aws CLI and boto3 in this shell: eval "$(cachevault local env)", which sets',
            *(f"  export {k}={shlex.quote(v)}" for k, v in env.items()),
            f"or a named profile for the aws CLI ({PROFILE}):",
            *(f"  {line}" for line in profile_setup(info.endpoint_url or "", info.credentials)),
        ]
    )
    payload = {
        "Endpoint": info.endpoint_url,
        "Pid": info.pid,
        "Bucket": info.bucket,
        "Schedules": schedules,
        "Environment": env,
    }
    emit(args, payload, human)
    return 0


DEFAULT_PORT = 4566
PORT_ENV = "CACHEVAULT_LOCAL_PORT"
PROFILE = "cachevault-local"


def profile_setup(endpoint: str, credentials: dict[str, str] | None = None) -> list[str]:
    """The aws CLI commands that make a profile for the embedded AWS, and one using it.

    ``credentials``: the embedded AWS's admin keys (it enforces IAM; cachevault_tools/local/iam.py).
    """
    keys = credentials or {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    settings = {
        "aws_access_key_id": keys["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": keys["AWS_SECRET_ACCESS_KEY"],
        "region": "us-east-1",
        "endpoint_url": endpoint,
    }
    lines = [f"aws configure set {k} {shlex.quote(v)} --profile {PROFILE}" for k, v in settings.items()]
    return [*lines, f"aws --profile {PROFILE} s3 ls"]


def user_environment(info: stack_info.StackInfo) -> dict[str, str]:
    """What the aws CLI, boto3 and cachevault itself need to reach the embedded AWS from any directory."""
    env = {
        "AWS_ENDPOINT_URL": info.endpoint_url or "",
        # The embedded AWS enforces IAM: its admin identity's keys (fake ones only with it off).
        **(info.credentials or stack_info.FAKE_CREDENTIALS),
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "SNAPSHOT_BUCKET": info.bucket,
        "CACHEVAULT_HOME": str(Settings.from_env().state_dir.resolve()),
    }
    return env


def _schedule_names(info: stack_info.StackInfo) -> list[str]:
    from cachevault.core.aws import client

    info.apply()
    events = client("events")
    rules = [r for page in events.get_paginator("list_rules").paginate() for r in page["Rules"]]
    return sorted(r["Name"] for r in rules if r.get("ScheduleExpression"))


def cmd_env(args: argparse.Namespace) -> int:
    info = stack_info.load_local(Settings.from_env())
    if info is None or not process_alive(info.pid):
        raise context.NotRunning("the local embedded AWS is not running: start it with `cachevault local up`.")
    env = user_environment(info)
    emit(args, {"Environment": env}, "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stopped = context.local_down()
    emit(args, {"Stopped": stopped}, "stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    info = stack_info.load_local(settings)
    running = info is not None and process_alive(info.pid)
    caches = context.local_caches(settings)
    payload = {
        "Running": running,
        "Endpoint": info.endpoint_url if running and info else None,
        "Pid": info.pid if running and info else None,
        "StateDir": str(settings.state_dir),
        "LocalCaches": sorted(caches),
        "LocalCacheNodes": {name: caches[name] for name in sorted(caches)},
    }
    described = [
        f"{name} ({n['Running']} nodes running" + (f", {n['Suspended']} stopped, data kept)" if n["Suspended"] else ")")
        for name, n in sorted(caches.items())
    ]
    human = (
        f"embedded AWS: {'running on ' + str(payload['Endpoint']) if running else 'stopped'}\n"
        f"state dir: {settings.state_dir}\nlocal caches: {', '.join(described) or '(none)'}"
    )
    emit(args, payload, human)
    return 0


def cmd_fire_schedule(args: argparse.Namespace) -> int:
    context.quiet_libraries()
    info = context.resolve_stack()
    if info.endpoint_url is None:
        raise context.NotRunning("fire-schedule needs the local embedded AWS: start it with `cachevault local up`.")
    info.apply()
    result = fire_deployed_schedule(info, args.name, at=args.time)
    human = f"fired {result['Schedule']} at {result['Time']} -> {result.get('ExecutionArn') or result['Target']}"
    if result.get("FunctionError"):
        human += f"\n{result['FunctionError']}: {result.get('Payload')}"
    elif result.get("Payload") is not None:
        human += "\n" + json.dumps(result["Payload"], indent=2)
    emit(args, result, human)
    return 1 if result.get("FunctionError") else 0


def fire_deployed_schedule(info: stack_info.StackInfo, name: str, *, at: str | None = None) -> dict[str, Any]:
    """Fire a schedule as the running local service deployed it.

    The server mirrors every template schedule into its EventBridge (rule + target), so
    the rule and target read back from there are exactly what its ticker fires; this
    delivers one firing through the same ``fire_schedule`` against its endpoint.
    """
    from datetime import UTC, datetime
    from pathlib import Path

    from cachevault.core.aws import client
    from cachevault.core.errors import InvalidParameterValue
    from cachevault.core.timeutil import parse_iso

    from cachevault_tools.local.deployer import DeployedStack, ScheduleInfo
    from cachevault_tools.local.schedules import fire_schedule

    events = client("events")
    rules = [r for page in events.get_paginator("list_rules").paginate() for r in page["Rules"]]
    rules = [r for r in rules if r.get("ScheduleExpression")]
    matches = [r for r in rules if r["Name"] == name] or [
        r for r in rules if r["Name"].endswith(f"-{name}") or f"-{name}-" in r["Name"]
    ]
    if len(matches) != 1:
        known = ", ".join(sorted(r["Name"] for r in rules)) or "(none)"
        what = "no schedule" if not matches else "more than one schedule"
        raise InvalidParameterValue(f"{what} matches {name!r}; schedules: {known}")
    rule = matches[0]
    target = events.list_targets_by_rule(Rule=rule["Name"])["Targets"][0]
    try:
        when = parse_iso(at) if at else datetime.now(UTC)
    except ValueError as exc:
        raise InvalidParameterValue(f"--time {at!r} is not an ISO 8601 time.") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    schedule = ScheduleInfo(
        name=rule["Name"],
        logical_id="",
        expression=rule["ScheduleExpression"],
        target_arn=target["Arn"],
        input=target.get("Input"),
        enabled=rule.get("State") == "ENABLED",
    )
    region = info.env().get("AWS_DEFAULT_REGION") or client("sts").meta.region_name
    account = client("sts").get_caller_identity()["Account"]
    stack = DeployedStack(
        stack_name=stack_info.STACK_NAME,
        region=region,
        account_id=account,
        template_path=Path("template.yaml"),
        endpoint_url=info.endpoint_url,
    )
    fired = fire_schedule(stack, schedule, now=when)
    return {
        "Schedule": schedule.name,
        "Time": when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "Target": schedule.target_arn,
        "ExecutionArn": fired.execution_arn,
        "Payload": fired.payload,
        "FunctionError": fired.function_error,
    }


def cmd_invoke(args: argparse.Namespace) -> int:
    """The handler's JSON result on stdout; on a function error its error JSON and exit 1."""
    from cachevault_tools.local import invoke
    from cachevault_tools.local.environment import find_template

    info = context.resolve_stack()
    info.apply()
    context.quiet_libraries()
    name = invoke.resolve_function(args.function, info.functions, find_template())
    result = invoke.invoke(name, invoke.load_event(args.event))
    payload = result.payload
    if result.function_error and isinstance(payload, dict):
        if not args.json:  # the one-line reason and what to do, not a Python traceback
            payload = {k: v for k, v in payload.items() if k != "stackTrace"}
        print(_invoke_hint(name, payload, args.event), file=sys.stderr)
    print(json.dumps(payload, indent=2, default=str))
    return 1 if result.function_error else 0


def _invoke_hint(function: str, error: dict[str, Any], event: Path | None) -> str:
    line = f"{function} failed: {error.get('errorType')}: {error.get('errorMessage')}"
    if str(error.get("errorType", "")).endswith("NotFoundFault"):
        line += (
            f"\nthe event ({event or 'empty'}) names something that does not exist in this embedded AWS: "
            "create it first (e.g. `cachevault cache create NAME`, `cachevault snapshot create CACHE NAME --wait`) "
            "or edit the event's names"
        )
    return line
