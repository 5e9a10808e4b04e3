"""The embedded AWS: moto's threaded server on loopback, Step Functions executing, Lambda running real handlers.

:class:`ServerAWS` runs moto's threaded HTTP server on ``127.0.0.1:<port>`` (4566 by
default, LocalStack's port) for the CLI, ``make demo``, the tests and every other process.
:mod:`cachevault_tools.local.lambda_runtime` is installed so Lambda invocations run the handlers
registered by the deployer, each function in worker processes of its own that call the
server back over HTTP (an in-process ``mock_aws`` cannot serve them), and
:mod:`cachevault_tools.local.s3_files` keeps S3 object bodies as files under
``$CACHEVAULT_HOME/s3/`` (memory flat in object size). The embedded ECS
(:mod:`cachevault_tools.local.ecs`) records its tasks under ``$CACHEVAULT_HOME/ecs/``: stopping
the server suspends node tasks with their data, :meth:`ServerAWS.resume_tasks` brings them back.

IAM is enforced (:mod:`cachevault_tools.local.iam`; ``CACHEVAULT_LOCAL_IAM=off`` turns it off):
the deployer, CLI and tests use an admin identity (:attr:`ServerAWS.credentials`), Lambda
environments and ECS tasks their role's STS credentials, Step Functions its role's.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
from cachevault.core.settings import Settings

from cachevault_tools.local import ecs, iam, lambda_runtime, s3_files
from cachevault_tools.local.deployer import DeployedStack, deploy

# State machines execute; IAM has the AWS managed policies SAM roles attach
# (AWSLambdaBasicExecutionRole ...), so roles are created exactly as translated.
SFN_EXECUTE = {"stepfunctions": {"execute_state_machine": True}, "iam": {"load_aws_managed_policies": True}}
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


class ServerAWS:
    """moto's ThreadedMotoServer on loopback, configured to execute state machines."""

    def __init__(self, port: int = DEFAULT_PORT, host: str = "127.0.0.1", region: str = DEFAULT_REGION) -> None:
        self.host = host
        self.port = port
        self.region = region
        self._server: Any = None
        self._env = EnvPatch()
        self._previous_sfn: bool = False
        self._previous_iam: dict[str, Any] = {}
        self.credentials: dict[str, str] = {}  # the admin identity's keys (IAM enforced)
        # Called by stop() once no Lambda or ECS task runs any more, before moto's reset.
        self.before_reset: list[Callable[[], None]] = []

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ServerAWS:
        from moto.core.config import default_user_config
        from moto.server import ThreadedMotoServer

        _check_port_free(self.host, self.port)
        werkzeug_log = logging.getLogger("werkzeug")
        if werkzeug_log.level == logging.NOTSET:  # one line per request otherwise
            werkzeug_log.setLevel(logging.WARNING)
        # moto's ASL interpreter calls Lambda at http://localhost:$MOTO_PORT in server mode.
        self._env.set("MOTO_PORT", str(self.port))
        # Set for good: a Lambda invocation's environment overlay would otherwise add and pop
        # it around each handler, and a Step Functions service task creating its boto3 client
        # on another thread at that moment read it half-gone (KeyError 'AWS_REGION').
        self._env.set("AWS_REGION", os.environ.get("AWS_REGION") or self.region)
        self._previous_sfn = bool(default_user_config.get("stepfunctions", {}).get("execute_state_machine"))
        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()
        _wait_ready(self.endpoint_url, timeout_s)
        _post_json(f"{self.endpoint_url}/moto-api/config", SFN_EXECUTE)
        # /moto-api/config takes no "iam" key; the threaded server runs in this process, so set
        # it here and start the backends afresh (the readiness probe instantiated them).
        self._previous_iam = dict(default_user_config.get("iam", {}))
        default_user_config["iam"] = dict(SFN_EXECUTE["iam"])
        _post_json(f"{self.endpoint_url}/moto-api/reset", None)
        lambda_runtime.install()
        s3_files.install(_s3_dir())
        self.credentials = _enforce_iam(self.endpoint_url, self.session)
        # Lambda environments and ECS tasks get their role's credentials (STS AssumeRole with
        # the admin identity, cachevault_tools/local/iam.py), the one way both obtain them.
        role_credentials = functools.partial(_role_credentials, self.session, self.endpoint_url)
        # Handlers run in worker processes: their boto3 clients call this server back.
        lambda_runtime.RUNTIME.base_env = {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "POWERTOOLS_TRACE_DISABLED": "true",  # no X-Ray daemon here
        }
        lambda_runtime.RUNTIME.role_credentials = role_credentials
        ecs.install()
        ecs.RUNNER.open(_ecs_dir())  # suspended node tasks come back in resume_tasks()
        # Task processes (capture workers) call the server back, as a task reaches AWS.
        ecs.RUNNER.base_env = {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_DEFAULT_REGION": self.region}
        ecs.RUNNER.role_credentials = role_credentials
        return self

    def resume_tasks(self) -> list[str]:
        """Node tasks of the previous run back (suspended ones restarted, live ones adopted), once
        the template is deployed again: their cluster and task definitions exist by then."""
        return ecs.RUNNER.resume()

    def stop(self) -> None:
        ecs.RUNNER.stop_all()  # node tasks suspended with their data, worker tasks stopped
        ecs.RUNNER.base_env = {}
        ecs.RUNNER.role_credentials = None
        lambda_runtime.RUNTIME.shutdown()
        for hook in self.before_reset:
            hook()
        _relax_iam()
        if self._server is not None:
            # Leave the process as found: the config is process-global, the backends too.
            _post_json(
                f"{self.endpoint_url}/moto-api/config",
                {"stepfunctions": {"execute_state_machine": self._previous_sfn}},
            )
            _post_json(f"{self.endpoint_url}/moto-api/reset", None)
            self._server.stop()
            from moto.core.config import default_user_config

            default_user_config["iam"] = self._previous_iam
            self._server = None
        lambda_runtime.RUNTIME.base_env = {}
        self._env.restore()

    def session(self) -> boto3.Session:
        creds = self.credentials or _FAKE_CREDENTIALS
        return boto3.Session(
            aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
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


def _enforce_iam(endpoint_url: str, admin_session: Callable[[], boto3.Session]) -> dict[str, str]:
    """Create the admin identity, install moto's IAM seams, enforce IAM.

    Returns the admin's keys, or {} when ``CACHEVAULT_LOCAL_IAM=off``.
    """
    if not iam.enforcement_wanted():
        return {}
    credentials = iam.create_admin(admin_session(), endpoint_url)  # before enforcement: nobody could
    iam.install_seams(admin_session)
    iam.enforce(True)
    return credentials


def _relax_iam() -> None:
    iam.enforce(False)
    iam.forget_credentials()
    lambda_runtime.RUNTIME.role_credentials = None


def _role_credentials(
    admin_session: Callable[[], boto3.Session], endpoint_url: str, role_arn: str
) -> dict[str, str]:
    return iam.role_credentials(admin_session(), role_arn, endpoint_url)


def start_server(port: int = DEFAULT_PORT, host: str = "127.0.0.1", region: str = DEFAULT_REGION) -> ServerAWS:
    return ServerAWS(port, host, region).start()


def _s3_dir() -> Path:
    return Settings.from_env().state_dir / "s3"


def _ecs_dir() -> Path:
    return Settings.from_env().state_dir / "ecs"


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
    # A reset drops every backend: on a loaded 2-core box it took over 10 s (a test setup failed).
    with urllib.request.urlopen(req, timeout=120) as resp:
        resp.read()
