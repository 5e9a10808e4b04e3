"""The whole local product in one object: embedded AWS + template.yaml deployed + env applied.

Used three ways: by the ``cachevault local up`` server process, by ``cachevault demo`` and
by the tests (both on a free loopback port, inside their own process). In every case the
embedded AWS is the loopback server and the real handlers under ``functions/`` run in
Lambda execution environments of their own when the state machines call them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cachevault.core import stack as stack_info
from cachevault.core.settings import Settings
from cachevault.ops import recovery

from cachevault_tools.local import durable as durable_state
from cachevault_tools.local.embedded import EnvPatch, ServerAWS
from cachevault_tools.local.redis_process import ChildReaper, free_port


def find_template() -> Path:
    """template.yaml of this checkout (or CACHEVAULT_TEMPLATE)."""
    explicit = os.environ.get("CACHEVAULT_TEMPLATE")
    if explicit:
        return Path(explicit).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "template.yaml"
        if candidate.exists() and (parent / "functions").is_dir():
            return candidate
    raise FileNotFoundError("template.yaml not found: set CACHEVAULT_TEMPLATE to the SAM template of cachevault")


PARAMETER_OVERRIDES_ENV = "CACHEVAULT_PARAMETER_OVERRIDES"


def parse_parameter_overrides(text: str) -> dict[str, str]:
    """``"ExportBucketAllowList=a,b LogLevel=DEBUG"`` -> {name: value} (sam's --parameter-overrides form)."""
    overrides = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{PARAMETER_OVERRIDES_ENV}: {item!r} is not Key=Value")
        overrides[name] = value
    return overrides


class LocalEnvironment:
    def __init__(
        self,
        *,
        port: int | None = None,
        state_dir: Path | None = None,
        log_level: str = "INFO",
        parameters: dict[str, str] | None = None,
        durable: bool = False,
    ) -> None:
        # Template parameters, like `sam deploy --parameter-overrides`: the environment's
        # CACHEVAULT_PARAMETER_OVERRIDES ("Key=Value Key2=Value2") first, then ``parameters``.
        from_env = parse_parameter_overrides(os.environ.get(PARAMETER_OVERRIDES_ENV, ""))
        self.parameters = {**from_env, **(parameters or {})}
        self.log_level = log_level
        self.port = port
        self.state_dir = Path(state_dir or Settings.from_env().state_dir).resolve()
        self.aws: ServerAWS | None = None
        self.deployed: Any = None
        self.info: stack_info.StackInfo | None = None
        self._env = EnvPatch()
        self._reaper: ChildReaper | None = None
        # The `local up` service keeps S3 and DynamoDB in its state dir across restarts and
        # crashes (cachevault_tools/local/durable.py); tests' throwaway environments need not.
        self.durable = durable
        self.restored: durable_state.Restored | None = None

    def start(self) -> stack_info.StackInfo:
        self._set_env("CACHEVAULT_HOME", str(self.state_dir))
        # No X-Ray daemon here: Powertools' Tracer would only discard subsegments noisily.
        self._set_env("POWERTOOLS_TRACE_DISABLED", "true")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Nodes started in this process (the tests' own, the CLI's) are waited for here when
        # another process stops them (`cachevault cache delete`), or they stay zombies.
        self._reaper = ChildReaper().start()
        self.aws = ServerAWS(port=self.port or free_port()).start()
        endpoint = self.aws.endpoint_url
        try:
            if self.durable:
                durable_state.install(self.state_dir)
                # Writes of running tasks are kept until they stop; the reset then keeps the files.
                self.aws.before_reset.append(durable_state.uninstall)
            overrides = {"LogLevel": self.log_level, **self.parameters}
            self.deployed = self.aws.deploy(find_template(), parameter_overrides=overrides)
            if self.durable:
                self.restored = durable_state.restore(self.state_dir)
            self.aws.resume_tasks()
            self.info = stack_info.from_deployed(
                self.deployed, endpoint_url=endpoint, pid=os.getpid(), credentials=self.aws.credentials
            )
            for name, value in self.info.env().items():
                self._set_env(name, value)
            for name, value in (self.aws.credentials or stack_info.FAKE_CREDENTIALS).items():
                self._set_env(name, value)
            self._set_env("AWS_DEFAULT_REGION", self.aws.region)
            recovery.recover_at_start(self.info)  # operations the previous embedded AWS left unfinished
        except BaseException:
            self.stop()
            raise
        return self.info

    def _set_env(self, name: str, value: str | None) -> None:
        self._env.set(name, value)

    def stop(self) -> None:
        if self.aws is not None:
            self.aws.stop()
            self.aws = None
        if self._reaper is not None:
            self._reaper.stop()
            self._reaper = None
        self._env.restore()

    def __enter__(self) -> LocalEnvironment:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
