"""``python -m cachevault_tools.local.server``: the embedded AWS as a long-lived local service.

Started (detached) by ``cachevault local up``: moto on 127.0.0.1:<port> with
template.yaml deployed, the schedule ticker firing the template's schedules, and
``<state_dir>/local/stack.json`` telling other processes where everything is. SIGTERM
(``cachevault local down``) stops it cleanly.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from cachevault.core import stack as stack_info
from cachevault.core.settings import Settings

from cachevault_tools.local import s3_files
from cachevault_tools.local.environment import LocalEnvironment
from cachevault_tools.local.schedules import ScheduleTicker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cachevault_tools.local.server")
    parser.add_argument("--port", type=int, default=4566)
    parser.add_argument("--state-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # The user's state dir: S3 and DynamoDB outlive this process (cachevault_tools/local/durable.py).
    env = LocalEnvironment(port=args.port, state_dir=args.state_dir, durable=True)
    info = env.start()
    if env.restored is not None:
        print(f"cachevault local: {env.restored.summary()}", flush=True)
    settings = Settings.from_env()
    ticker = ScheduleTicker(env.deployed, interval_s=5.0)
    ticker.start()
    s3_files.freeze_heap()  # what is alive now lives as long as the server
    path = stack_info.save_local(info, settings)
    print(f"cachevault local: embedded AWS on {info.endpoint_url}; stack in {path}", flush=True)
    try:
        stop.wait()
    finally:
        ticker.stop()
        path.unlink(missing_ok=True)
        env.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
