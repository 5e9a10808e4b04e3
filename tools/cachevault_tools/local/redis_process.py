"""One local ``redis-server`` process: start it on a free loopback port, stop it, find it again.

A node is described entirely by its data directory (config, pidfile, logfile, dump.rdb,
nodes.conf live there) plus host/port/pid, so a different process (the CLI runs every
command in a new one) can stop it later. Before any signal is sent the PID is checked
against /proc: it must still be a redis/valkey server whose title carries our port and
whose working directory is our data dir (redis chdir()s into ``dir``). Nothing is ever
killed by name.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from cachevault.core.errors import CacheVaultError
from cachevault.nodes.credentials import Tls
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
DEFAULT_SERVER = "/usr/bin/redis-server"
CONFIG_NAME = "redis.conf"
PID_NAME = "redis.pid"
LOG_NAME = "redis.log"
STDERR_NAME = "redis.stderr"  # config errors are printed before the logfile opens
RDB_NAME = "dump.rdb"
_SERVER_NAMES = ("redis-server", "valkey-server")
_PORT_ATTEMPTS = 8
CLUSTER_BUS_OFFSET = 10000
_BUS_PORT_LOW, _BUS_PORT_HIGH, _BUS_PORT_DRAWS = 20000, 32000, 200
_LOG_TAIL_LINES = 25

# Popen handles of nodes this process started: kept so the children are reaped (no
# zombies, no "still running" warnings) however the node ends.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class RedisNodeError(CacheVaultError):
    """A local node failed to start, answer or stop."""

    code = "RedisNodeFailure"
    http_status = 500


def node_client(
    host: str,
    port: int,
    *,
    password: str | None = None,
    tls_ca: str | None = None,
    timeout: float = 10.0,
    **kwargs: Any,
) -> redis.Redis:
    """A client for one local node: no retries, one timeout for connecting and for each reply."""
    tls = Tls(ca_file=tls_ca).redis_kwargs() if tls_ca else {}
    return redis.Redis(
        host=host,
        port=port,
        password=password,
        **tls,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=no_retry(),
        **kwargs,
    )


def no_retry() -> Retry:
    # redis-py 8 retries a refused connection with backoff by default (seconds per
    # command); every wait here is our own bounded poll, so fail fast instead.
    return Retry(NoBackoff(), 0)


def server_path() -> str:
    return os.environ.get("CACHEVAULT_REDIS_SERVER", DEFAULT_SERVER)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, cluster_bus: bool = False) -> int:
    """A port nobody listens on (and, for cluster nodes, port+10000 too).

    There is a window until redis binds it, so the caller retries on "Address already
    in use".
    """
    if not cluster_bus:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            return int(sock.getsockname()[1])
    # The cluster bus listens on port+10000, so the port must be <= 55535: draw below
    # the usual ephemeral range instead of asking the kernel.
    for _ in range(_BUS_PORT_DRAWS):
        port = random.randrange(_BUS_PORT_LOW, _BUS_PORT_HIGH)
        if _bindable(port) and _bindable(port + CLUSTER_BUS_OFFSET):
            return port
    raise RedisNodeError(f"no free port pair (port, port+{CLUSTER_BUS_OFFSET}) found")


def _render_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return " ".join(_render_value(v) for v in value)
    text = str(value)
    if text == "" or any(c in text for c in " \t\"'\\"):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def render_config(settings: Mapping[str, Any]) -> str:
    return "".join(f"{key} {_render_value(value)}\n" for key, value in settings.items())


def base_config(data_dir: Path, port: int, *, cluster_enabled: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bind": HOST,
        "port": port,
        "daemonize": "no",
        "dir": str(data_dir),
        "pidfile": str(data_dir / PID_NAME),
        "logfile": str(data_dir / LOG_NAME),
        "dbfilename": RDB_NAME,
        "save": "",
        "appendonly": "no",
        # Capture speed (DESIGN.md): the default 5 s diskless delay dominates small syncs.
        "repl-diskless-sync": "yes",
        "repl-diskless-sync-delay": 0,
        # DEBUG DIGEST / DEBUG RELOAD are how tests prove restores are exact.
        "enable-debug-command": "local",
    }
    if cluster_enabled:
        config["cluster-enabled"] = "yes"
        config["cluster-config-file"] = "nodes.conf"
        config["cluster-node-timeout"] = 5000
    return config


def _proc_start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces; everything after the last ')' is fixed-width.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def process_alive(pid: int | None, start_time: int | None = None) -> bool:
    """True if ``pid`` runs (zombies count as gone); ``start_time`` guards PID reuse."""
    if not pid or pid <= 0:
        return False
    _reap(pid)
    started = _proc_start_time(pid)
    if started is None:
        return False
    return start_time is None or started == start_time


def own_start_time() -> int | None:
    return _proc_start_time(os.getpid())


def is_our_redis(pid: int, port: int, data_dir: Path) -> bool:
    """The PID is a redis/valkey server listening on ``port`` with cwd ``data_dir``."""
    if not process_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    words = cmdline.split()
    if not words:
        return False
    exe = os.path.basename(words[0])
    names = (*_SERVER_NAMES, os.path.basename(server_path()))
    if not any(exe.startswith(name) for name in names):
        return False
    if not re.search(rf":{port}(?:\s|$)", cmdline):  # the proc title: "<exe> 127.0.0.1:<port>"
        return False
    return os.path.realpath(cwd) == os.path.realpath(data_dir)


def _reap(pid: int) -> None:
    proc = _CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            _CHILDREN.pop(pid, None)
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def reap_exited_children() -> list[int]:
    """Wait for every node this process started that has exited; returns their PIDs.

    A node is often stopped by another process (``cachevault cache delete`` kills by PID
    the nodes a restore started inside the embedded AWS): only its parent can reap it.
    Only our own Popen handles are polled, so no other child's exit status is taken.
    """
    reaped = []
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            _CHILDREN.pop(pid, None)
            reaped.append(pid)
    return reaped


class ChildReaper:
    """A daemon thread reaping exited nodes of a long-lived process (the embedded AWS)."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-reaper", daemon=True)

    def start(self) -> ChildReaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        reap_exited_children()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            reap_exited_children()


def _log_tail(data_dir: Path) -> str:
    lines: list[str] = []
    for name in (STDERR_NAME, LOG_NAME):
        with contextlib.suppress(OSError):
            lines += (data_dir / name).read_text(errors="replace").splitlines()
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(no log)"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.01)
    return not process_alive(pid)


@dataclass
class RedisProcess:
    """A running (or once running) local node."""

    host: str
    port: int
    pid: int
    data_dir: Path
    password: str | None = None
    tls_ca: str | None = None  # set: the node listens on TLS only (port 0), verified against this CA

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.host, self.port)

    def client(self, *, timeout: float = 10.0, **kwargs: Any) -> redis.Redis:
        return node_client(self.host, self.port, password=self.password, tls_ca=self.tls_ca, timeout=timeout, **kwargs)

    def alive(self) -> bool:
        return is_our_redis(self.pid, self.port, self.data_dir)

    def log_tail(self) -> str:
        return _log_tail(self.data_dir)

    def kill(self) -> None:
        """SIGKILL (fault injection); a no-op if the PID is no longer our node."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            _wait_gone(self.pid, 5.0)

    def stop(self, timeout: float = 10.0) -> None:
        """SHUTDOWN NOSAVE NOW, then SIGTERM, then SIGKILL; each step bounded."""
        if not self.alive():
            _reap(self.pid)
            return
        client = self.client(timeout=2.0)
        try:
            try:
                # NOW: don't wait for lagging replicas (7.0+); older servers reject it.
                client.execute_command("SHUTDOWN", "NOSAVE", "NOW")
            except redis.ResponseError:
                client.execute_command("SHUTDOWN", "NOSAVE")
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            pass  # a dropped connection is the normal answer to SHUTDOWN
        finally:
            client.close()
        if _wait_gone(self.pid, timeout / 2):
            return
        for sig, wait in ((signal.SIGTERM, timeout / 4), (signal.SIGKILL, timeout / 4)):
            if not self.alive():
                return
            os.kill(self.pid, sig)
            if _wait_gone(self.pid, wait):
                return
        raise RedisNodeError(f"redis-server pid {self.pid} on port {self.port} did not stop")

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "pid": self.pid,
            "data_dir": str(self.data_dir),
        }


def wait_ready(node: RedisProcess, timeout: float) -> None:
    """Until PING answers and the dataset is loaded (``loading:0``); fail fast if it dies."""
    deadline = time.monotonic() + timeout
    client = node.client(timeout=2.0)
    try:
        while True:
            if not process_alive(node.pid):
                raise RedisNodeError(
                    f"redis-server on port {node.port} exited during start-up:\n{node.log_tail()}",
                    port=node.port,
                )
            try:
                if client.ping() and client.info("persistence").get("loading") == 0:
                    return
            except redis.BusyLoadingError:
                pass  # loading an RDB; keep waiting
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RedisNodeError(
                    f"redis-server on port {node.port} not ready after {timeout:.0f}s:\n{node.log_tail()}",
                    port=node.port,
                )
            time.sleep(0.01)
    finally:
        client.close()


def _place_rdb(rdb_file: Path, data_dir: Path) -> None:
    target = data_dir / RDB_NAME
    target.unlink(missing_ok=True)
    # A hard link costs nothing for a many-GB file; redis only ever replaces dump.rdb by
    # rename(), so the seed is never modified. Another filesystem: a symlink.
    try:
        os.link(rdb_file, target)
    except OSError:
        target.symlink_to(rdb_file.resolve())


def start_node(
    data_dir: Path,
    *,
    cluster_enabled: bool = False,
    config: Mapping[str, Any] | None = None,
    rdb_file: Path | None = None,
    password: str | None = None,
    tls: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> RedisProcess:
    """Start a node in ``data_dir`` on a free port, optionally loading ``rdb_file``.

    Returns when the node answers PING with its dataset loaded. ``timeout`` bounds the
    wait (large seed RDBs load at roughly 150 MB/s). ``tls`` (``cert_file``, ``key_file``,
    ``ca_file``) makes a TLS-only node: ``tls-port`` on the free port, plaintext ``port 0``,
    replication and cluster bus over TLS too.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if rdb_file is not None:
        if not rdb_file.is_file():
            raise RedisNodeError(f"seed RDB {rdb_file} does not exist")
        _place_rdb(rdb_file, data_dir)
    if password is None and config and config.get("requirepass"):
        password = str(config["requirepass"])  # our own polls must authenticate too
    binary = server_path()
    last_error: RedisNodeError | None = None
    for _ in range(_PORT_ATTEMPTS):
        port = free_port(cluster_bus=cluster_enabled)
        settings = base_config(data_dir, port, cluster_enabled=cluster_enabled)
        if password:
            settings["requirepass"] = password
            settings["masterauth"] = password
        if tls:
            settings.update(_tls_config(port, tls))
        settings.update(config or {})
        _write_private(data_dir / CONFIG_NAME, render_config(settings))
        (data_dir / LOG_NAME).unlink(missing_ok=True)
        (data_dir / "nodes.conf").unlink(missing_ok=True)
        with open(data_dir / STDERR_NAME, "wb") as stderr:
            proc = subprocess.Popen(
                [binary, str(data_dir / CONFIG_NAME)],
                cwd=data_dir,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                # Own session: the node outlives the CLI process that started it, and a
                # Ctrl-C in a terminal does not reach it. Cleanup is by PID (stop / reap).
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        node = RedisProcess(HOST, port, proc.pid, data_dir, password, tls["ca_file"] if tls else None)
        try:
            wait_ready(node, timeout)
            return node
        except RedisNodeError as exc:
            with contextlib.suppress(RedisNodeError):
                node.stop(timeout=5.0)
            if "Address already in use" not in node.log_tail():
                raise
            last_error = exc  # someone took the port between our probe and redis' bind
    raise RedisNodeError(f"no free port after {_PORT_ATTEMPTS} attempts: {last_error}")


def node_from_dir(data_dir: Path) -> RedisProcess | None:
    """Rebuild a node handle from its data dir (pidfile + config), or None."""
    try:
        pid = int((data_dir / PID_NAME).read_text().strip())
        conf = (data_dir / CONFIG_NAME).read_text().splitlines()
    except (OSError, ValueError):
        return None
    port = None
    password = None
    tls_ca = None
    for line in conf:
        key, _, value = line.partition(" ")
        if key in ("port", "tls-port") and int(value):  # a TLS-only node has port 0
            port = int(value)
        elif key == "tls-ca-cert-file":
            tls_ca = value.strip('"')
        elif key == "requirepass":
            password = value.strip('"')
    if port is None:
        return None
    return RedisProcess(HOST, port, pid, data_dir.resolve(), password, tls_ca)


def _tls_config(port: int, tls: Mapping[str, str]) -> dict[str, Any]:
    return {
        "port": 0,  # no plaintext listener at all
        "tls-port": port,
        "tls-cert-file": tls["cert_file"],
        "tls-key-file": tls["key_file"],
        "tls-ca-cert-file": tls["ca_file"],
        "tls-auth-clients": "no",  # server-authenticated TLS, clients prove themselves with AUTH
        "tls-replication": "yes",
        "tls-cluster": "yes",
    }


def _write_private(path: Path, text: str) -> None:
    """The config may hold requirepass / ACL users: readable by the owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)
