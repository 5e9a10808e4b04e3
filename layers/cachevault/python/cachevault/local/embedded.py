"""The embedded AWS: moto, with Step Functions executing and Lambda running real handlers.

Two modes:

* in-process (:class:`InProcessAWS`): ``mock_aws`` intercepts every boto3 call in this
  process; what tests use.
* server (:class:`ServerAWS`): moto's threaded HTTP server on ``127.0.0.1:<port>`` (4566
  by default, LocalStack's port) for the CLI, ``make demo`` and other processes. The
  server is threaded, so a handler running inside it may call back into it over HTTP.

Either way, :mod:`cachevault.local.lambda_runtime` is installed so Lambda invocations run
the handlers registered by the deployer, and Step Functions executes state machines, and
:mod:`cachevault.local.s3_files` keeps S3 object bodies as files under
``$CACHEVAULT_HOME/s3/`` (memory flat in object size).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import boto3

from cachevault.local import lambda_runtime, s3_files
from cachevault.local.deployer import DeployedStack, deploy
from cachevault.settings import Settings

SFN_EXECUTE = {"stepfunctions": {"execute_state_machine": True}}
DEFAULT_PORT = 4566
DEFAULT_REGION = "us-east-1"
_FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class EnvPatch:
    """Sets/unsets process env vars and puts the old values back."""

    def __init__(self) -> None:
        self._saved: dict[str, str | None] = {}

    def set(self, name: str, value: str | None) -> None:
        self._saved.setdefault(name, os.environ.get(name))
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def restore(self) -> None:
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved.clear()


class InProcessAWS:
    """``mock_aws`` with state-machine execution on and the local Lambda runtime."""

    endpoint_url: str | None = None

    def __init__(self, region: str = DEFAULT_REGION) -> None:
        self.region = region
        self._mock: Any = None
        self._env = EnvPatch()

    def start(self) -> InProcessAWS:
        from moto import mock_aws

        # An endpoint in the environment would send boto3 past the in-process mock.
        self._env.set("AWS_ENDPOINT_URL", None)
        self._env.set("AWS_DEFAULT_REGION", os.environ.get("AWS_DEFAULT_REGION") or self.region)
        self._mock = mock_aws(config=SFN_EXECUTE)  # type: ignore[arg-type]
        self._mock.start()
        lambda_runtime.install()
        s3_files.install(_s3_dir())
        lambda_runtime.RUNTIME.base_env = {"AWS_ENDPOINT_URL": None}
        return self

    def stop(self) -> None:
        if self._mock is not None:
            self._mock.stop()
            self._mock = None
        lambda_runtime.RUNTIME.base_env = {}
        self._env.restore()

    def session(self) -> boto3.Session:
        return boto3.Session(region_name=self.region)

    def deploy(self, template: Path, **kwargs: Any) -> DeployedStack:
        return deploy(template, session=self.session(), **kwargs)

    def __enter__(self) -> InProcessAWS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerAWS:
    """moto's ThreadedMotoServer on loopback, configured to execute state machines."""

    def __init__(self, port: int = DEFAULT_PORT, host: str = "127.0.0.1", region: str = DEFAULT_REGION) -> None:
        self.host = host
        self.port = port
        self.region = region
        self._server: Any = None
        self._env = EnvPatch()
        self._previous_sfn: bool = False

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> ServerAWS:
        from moto.core.config import default_user_config
        from moto.server import ThreadedMotoServer

        _check_port_free(self.host, self.port)
        werkzeug_log = logging.getLogger("werkzeug")
        if werkzeug_log.level == logging.NOTSET:  # one line per request otherwise
            werkzeug_log.setLevel(logging.WARNING)
        # moto's ASL interpreter calls Lambda at http://localhost:$MOTO_PORT in server mode.
        self._env.set("MOTO_PORT", str(self.port))
        self._previous_sfn = bool(default_user_config.get("stepfunctions", {}).get("execute_state_machine"))
        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()
        _wait_ready(self.endpoint_url, timeout_s)
        _post_json(f"{self.endpoint_url}/moto-api/config", SFN_EXECUTE)
        lambda_runtime.install()
        s3_files.install(_s3_dir())
        # Handlers run inside the server process: their boto3 clients must call it back.
        lambda_runtime.RUNTIME.base_env = {"AWS_ENDPOINT_URL": self.endpoint_url, **_FAKE_CREDENTIALS}
        return self

    def stop(self) -> None:
        if self._server is not None:
            # Leave the process as found: the config is process-global, the backends too.
            _post_json(
                f"{self.endpoint_url}/moto-api/config",
                {"stepfunctions": {"execute_state_machine": self._previous_sfn}},
            )
            _post_json(f"{self.endpoint_url}/moto-api/reset", None)
            self._server.stop()
            self._server = None
        lambda_runtime.RUNTIME.base_env = {}
        self._env.restore()

    def session(self) -> boto3.Session:
        return boto3.Session(
            aws_access_key_id=_FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=_FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=self.region,
        )

    def client(self, service: str) -> Any:
        return self.session().client(service, endpoint_url=self.endpoint_url)

    def deploy(self, template: Path, **kwargs: Any) -> DeployedStack:
        return deploy(template, session=self.session(), endpoint_url=self.endpoint_url, **kwargs)

    def __enter__(self) -> ServerAWS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_process(region: str = DEFAULT_REGION) -> InProcessAWS:
    return InProcessAWS(region).start()


def start_server(port: int = DEFAULT_PORT, host: str = "127.0.0.1", region: str = DEFAULT_REGION) -> ServerAWS:
    return ServerAWS(port, host, region).start()


def _s3_dir() -> Path:
    return Settings.from_env().state_dir / "s3"


def _check_port_free(host: str, port: int) -> None:
    # ThreadedMotoServer.start() blocks forever if its bind fails: fail fast here instead.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot start the embedded AWS on {host}:{port}: {exc}") from exc


def _wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=2):
                return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"embedded AWS at {url} not ready after {timeout_s}s: {last}")


def _post_json(url: str, body: Any) -> None:
    data = b"" if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()
