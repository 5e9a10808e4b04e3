"""cachevault local up|down|status: the embedded AWS as a local background service."""

from __future__ import annotations

import argparse
from typing import Any

from cachevault import stack as stack_info
from cachevault.cli import context
from cachevault.cli.output import add_json_flag, emit
from cachevault.local.redis_process import process_alive
from cachevault.settings import Settings


def register(sub: Any) -> None:
    local = sub.add_parser("local", help="the embedded AWS (moto) with template.yaml deployed, on 127.0.0.1")
    verbs = local.add_subparsers(dest="verb", required=True, metavar="VERB")
    up = verbs.add_parser("up", help="start the embedded AWS in the background and deploy template.yaml")
    up.add_argument("--port", type=int, default=4566, help="loopback port (default 4566)")
    add_json_flag(up)
    up.set_defaults(func=cmd_up, operation="LocalUp")
    down = verbs.add_parser("down", help="stop the embedded AWS and every local cache node")
    add_json_flag(down)
    down.set_defaults(func=cmd_down, operation="LocalDown")
    status = verbs.add_parser("status", help="is it running, where, and which local caches exist")
    add_json_flag(status)
    status.set_defaults(func=cmd_status, operation="LocalStatus")


def cmd_up(args: argparse.Namespace) -> int:
    info = context.local_up(args.port)
    emit(
        args,
        {"Endpoint": info.endpoint_url, "Pid": info.pid},
        f"embedded AWS up on {info.endpoint_url} (pid {info.pid})",
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stopped = context.local_down()
    emit(args, {"Stopped": stopped}, "stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cachevault.local.fleet import Fleet

    settings = Settings.from_env()
    info = stack_info.load_local(settings)
    running = info is not None and process_alive(info.pid)
    caches = [c.name for c in Fleet(settings.state_dir).list_caches()]
    payload = {
        "Running": running,
        "Endpoint": info.endpoint_url if running and info else None,
        "Pid": info.pid if running and info else None,
        "StateDir": str(settings.state_dir),
        "LocalCaches": caches,
    }
    human = (
        f"embedded AWS: {'running on ' + str(payload['Endpoint']) if running else 'stopped'}\n"
        f"state dir: {settings.state_dir}\nlocal caches: {', '.join(caches) or '(none)'}"
    )
    emit(args, payload, human)
    return 0
