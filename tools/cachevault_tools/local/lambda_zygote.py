"""A pre-imported parent for Lambda execution environments: the local runtime's cold-start cache.

``python -I -B -m cachevault_tools.local.lambda_zygote <socket fd>`` starts with a minimal
environment (no credentials, none of a function's variables), imports the third-party
modules the handlers use (:data:`PRELOAD`: boto3, botocore, Powertools, redis-py, ...; never
a handler, never the layer package, never ``aws_xray_sdk.core``, which builds a botocore
session from the environment at import) and then, single-threaded, forks one process per
new execution environment. The child becomes exactly what
``python -m cachevault_tools.local.lambda_worker`` would be (its own session, the function's
environment and nothing else, the code directory as working directory, its pipes on fds
0-4) and runs :func:`~cachevault_tools.local.lambda_worker.main`: the sandbox (a mount
namespace needs a single-threaded process, which a fork of this one is), then the
handler's import, as a fresh worker does. Only the interpreter start and the preloaded
imports are shared; the init phase still imports the handler and the layer per environment.

Honesty check: the zygote records which variables the preloaded modules read at import
(botocore reads ``AWS_NEW_RETRIES_2026``, Powertools ``AWS_EXECUTION_ENV`` and
``POWERTOOLS_DEBUG``, ...) and :class:`Zygote` forks only for an environment whose values of
those variables are the zygote's; any other gets a fresh process (``accepts``).

The zygote reaps its children and reports each exit status over the socket:
:class:`ForkedProcess` is the runtime's handle on such a child (``pid``, ``poll``, ``wait``,
``returncode``, ``stdout``/``stderr``), what :class:`subprocess.Popen` is for a fresh worker.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any, BinaryIO

from cachevault_tools.local.lambda_sandbox import _SPAWNER, _die_with_parent

PR_SET_NAME = 15
# What every handler imports, in import order; the layer's own package is not among them.
PRELOAD = (
    "boto3",
    "boto3.session",
    "botocore.session",
    "botocore.client",
    "botocore.config",
    "botocore.exceptions",
    "boto3.dynamodb.conditions",
    "boto3.s3.transfer",
    "s3transfer",
    "urllib3",
    "redis",
    "hiredis",
    "anycrc",
    "dateutil.parser",
    "jmespath",
    "wrapt",
    "aws_lambda_powertools",
    "aws_lambda_powertools.logging",
    "aws_lambda_powertools.metrics",
    "aws_lambda_powertools.tracing",
    "aws_lambda_powertools.utilities.typing",
)
_FIRST_FREE_FD = 5  # 0-2 stdio, 3 requests, 4 replies (lambda_worker.main's arguments)
_MAX_MESSAGE = 1 << 20


def zygote_environment(runtime: str) -> dict[str, str]:
    """The zygote's whole environment: what is the same for every function of ``runtime``."""
    return {
        "LANG": "C.UTF-8",
        "TZ": ":UTC",
        "PATH": "/usr/bin:/bin",
        "AWS_EXECUTION_ENV": f"AWS_Lambda_{runtime}",
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
    }


# --- the zygote process ---------------------------------------------------------------


def preload(modules: tuple[str, ...]) -> dict[str, str | None]:
    """Import ``modules``; return every environment variable read meanwhile, with its value."""
    environ_type = type(os.environ)
    real_getitem = environ_type.__getitem__
    read: set[str] = set()

    def getitem(self: Any, key: str) -> Any:  # get(), getenv() and ``in`` all come here
        read.add(key)
        return real_getitem(self, key)

    environ_type.__getitem__ = getitem  # type: ignore[method-assign]
    try:
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError:
                continue  # not installed here: the handler will say so itself
    finally:
        environ_type.__getitem__ = real_getitem  # type: ignore[method-assign]
    return {key: os.environ.get(key) for key in sorted(read)}


def _send(sock: socket.socket, message: Mapping[str, Any]) -> None:
    sock.send(json.dumps(message).encode())


def serve(sock: socket.socket) -> int | None:
    """The zygote's loop. Returns None when the runtime closed the socket; in a forked child,
    the environment's exit code (the child never comes back into the loop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the runtime decides
    import_env = preload(PRELOAD)
    single = threading.active_count() == 1 and len(os.listdir("/proc/self/task")) == 1
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    _send(sock, {"ready": True, "pid": os.getpid(), "single_threaded": single, "import_env": import_env})
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
        if sock in readable:
            try:
                data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 8)
            except OSError:
                data, fds = b"", []
            if not data:
                return None  # the runtime is gone: so are we (children die with us, PDEATHSIG)
            request = json.loads(data)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                return _become_environment(request, fds, sock, (wake_r, wake_w))
            for fd in fds:
                os.close(fd)
            _send(sock, {"id": request["id"], "pid": pid})
        _reap(sock)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _become_environment(request: dict[str, Any], fds: list[int], sock: socket.socket, wake: tuple[int, int]) -> int:
    """In the forked child: the process a fresh worker would be, then the worker itself."""
    zygote = os.getppid()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sock.close()
    for fd in wake:
        os.close(fd)
    os.setsid()  # start_new_session, as Popen does for a fresh worker
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: end with the zygote (which ends with the runtime)
    if os.getppid() != zygote:
        return 1  # the zygote died before the prctl
    libc.prctl(PR_SET_NAME, b"lambda_worker", 0, 0, 0)
    # fds: stdout, stderr, requests, replies. Moved above the target numbers first (they may be 3 or 4).
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 64) for fd in fds]
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    for target, fd in zip((1, 2, 3, 4), high, strict=True):
        os.dup2(fd, target)
    os.closerange(_FIRST_FREE_FD, os.sysconf("SC_OPEN_MAX"))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()
    from cachevault_tools.local import lambda_worker

    sys.argv = [lambda_worker.__file__, "3", "4"]
    return lambda_worker.main(["3", "4"])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(args[0]))
    try:
        code = serve(sock)
    except BaseException:
        if os.getpid() != _ZYGOTE_PID:
            traceback.print_exc()
            return 1
        raise
    return 0 if code is None else code


_ZYGOTE_PID = os.getpid()


# --- the runtime's side ----------------------------------------------------------------


class ZygoteUnavailable(Exception):
    pass


class ForkedProcess:
    """A child of the zygote, seen from the runtime (the subset of Popen the sandbox uses)."""

    def __init__(self, zygote: Zygote, pid: int, stdout: BinaryIO, stderr: BinaryIO) -> None:
        self._zygote = zygote
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr

    @property
    def returncode(self) -> int | None:
        return self._zygote.exit_code(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self._zygote.wait_exit(self.pid, timeout)


class Zygote:
    """One zygote process per Lambda runtime name (python3.11, ...), started on demand."""

    def __init__(self, runtime: str) -> None:
        self.runtime = runtime
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[int, int] = {}
        self._exits: dict[int, int] = {}
        self._next_id = 0
        self._dead = False
        self.import_env: dict[str, str | None] = {}
        self.usable = False

    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._dead

    def start(self, timeout_s: float) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [sys.executable, "-I", "-B", "-m", __name__, str(child.fileno())]

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(  # from the spawner thread, as workers: PDEATHSIG means that thread
                command,
                env=zygote_environment(self.runtime),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(child.fileno(),),
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )

        try:
            self._proc = _SPAWNER.run(spawn)
        finally:
            child.close()
        self._sock = parent
        parent.settimeout(timeout_s)
        try:
            ready = json.loads(parent.recv(_MAX_MESSAGE) or b"{}")
        except (OSError, ValueError) as exc:
            self.stop()
            raise ZygoteUnavailable(f"the Lambda zygote did not start: {exc}") from exc
        parent.settimeout(None)
        if not ready.get("ready"):
            self.stop()
            raise ZygoteUnavailable("the Lambda zygote did not start")
        self.import_env = dict(ready.get("import_env") or {})
        self.usable = bool(ready.get("single_threaded"))
        threading.Thread(target=self._read, name="lambda-zygote", daemon=True).start()

    def accepts(self, env: Mapping[str, str]) -> bool:
        """Whether a fork is the process a fresh worker with ``env`` would be (see the module doc)."""
        return self.alive and self.usable and all(env.get(k) == v for k, v in self.import_env.items())

    def spawn(
        self, cwd: str, env: Mapping[str, str], req_read: int, rep_write: int, timeout_s: float = 30.0
    ) -> ForkedProcess:
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        try:
            with self._cond:
                self._next_id += 1
                ident = self._next_id
            body = json.dumps({"id": ident, "cwd": cwd, "env": dict(env)}).encode()
            with self._send_lock:
                if self._sock is None:
                    raise ZygoteUnavailable("the Lambda zygote is stopped")
                socket.send_fds(self._sock, [body], [out_write, err_write, req_read, rep_write])
            deadline = time.monotonic() + timeout_s
            with self._cond:
                while ident not in self._replies:
                    left = deadline - time.monotonic()
                    if self._dead or left <= 0:
                        raise ZygoteUnavailable("the Lambda zygote did not fork")
                    self._cond.wait(left)
                pid = self._replies.pop(ident)
        except BaseException:
            os.close(out_read)
            os.close(err_read)
            raise
        finally:
            os.close(out_write)
            os.close(err_write)
        return ForkedProcess(self, pid, os.fdopen(out_read, "rb", buffering=0), os.fdopen(err_read, "rb", buffering=0))

    def exit_code(self, pid: int) -> int | None:
        with self._cond:
            if pid in self._exits:
                return self._exits[pid]
            # A dead zygote's children were killed with it (PR_SET_PDEATHSIG).
            return -signal.SIGKILL if self._dead else None

    def wait_exit(self, pid: int, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                code = self.exit_code(pid)
                if code is not None:
                    return code
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(f"lambda environment {pid}", timeout or 0)
                self._cond.wait(left)

    def stop(self) -> None:
        """End the zygote (call once its environments are gone: they would die with it)."""
        with self._send_lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
        with self._cond:
            self._dead = True
            self._cond.notify_all()

    def _read(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(_MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                break
            message = json.loads(data)
            with self._cond:
                if "exited" in message:
                    self._exits[int(message["exited"])] = int(message["code"])
                else:
                    self._replies[int(message["id"])] = int(message["pid"])
                self._cond.notify_all()
        with self._cond:
            self._dead = True
            self._cond.notify_all()


if __name__ == "__main__":
    raise SystemExit(main())
