"""One Lambda execution environment seen from the runtime: a worker process and its tree.

:class:`ExecutionEnvironment` starts ``python -m cachevault_tools.local.lambda_worker`` with the
environment it is given (nothing inherited), the code directory as working directory,
waits for its init phase, then runs invocations on it: the reply is awaited until the
function's Timeout while the resident memory of the worker and everything it started is
watched against MemorySize. Between invocations the whole tree can be frozen (SIGSTOP),
as Lambda freezes an environment when the handler returns.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachevault_tools.local.lambda_worker import read_message, write_message

if TYPE_CHECKING:
    from cachevault_tools.local.lambda_zygote import ForkedProcess, Zygote

PR_SET_PDEATHSIG = 1
_PAGE = os.sysconf("SC_PAGE_SIZE")
POLL_S = 0.02  # memory sampling period while an invocation runs


@dataclass(frozen=True)
class WorkerSetup:
    """Everything that makes one kind of environment (environments with equal setups are interchangeable)."""

    function_name: str
    code_dir: Path
    handler: str
    layer_dirs: tuple[Path, ...]
    env: tuple[tuple[str, str], ...]  # the process environment, exactly
    tmp_mb: int | None  # private /tmp of this size; None = the host's /tmp
    read_only: bool
    no_redis: bool
    isolation: str = "auto"  # auto: mount namespace if possible, else audit hook | audit


@dataclass(frozen=True)
class Outcome:
    kind: str  # result | error | timeout | oom | exit
    body: Any = None  # JSON text of the result, or the error dict
    detail: str = ""


class InitError(Exception):
    def __init__(self, payload: dict[str, Any]) -> None:
        super().__init__(payload.get("errorMessage", ""))
        self.payload = payload


class _Spawner:
    """Starts workers from one long-lived thread.

    A worker asks the kernel to kill it when its parent dies (PR_SET_PDEATHSIG), and the
    kernel means the parent *thread*: requests of the threaded server come and go, so
    every worker is forked from this thread, which lives as long as the process.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, job: Callable[[], Any]) -> Any:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="lambda-spawner", daemon=True)
                self._thread.start()
        done: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._jobs.put((job, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _loop(self) -> None:
        while True:
            job, done = self._jobs.get()
            try:
                done.put((True, job()))
            except BaseException as exc:
                done.put((False, exc))


_SPAWNER = _Spawner()


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant (through /proc/<pid>/task/*/children), parents first."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop(0)
        found.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{current}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            pending.extend(int(c) for c in children if int(c) not in found)
    return found


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        try:
            total += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


def _signal_tree(pid: int, sig: int, *, own_session_only: bool = False) -> None:
    members = process_tree(pid)
    if own_session_only:
        members = [m for m in members if _session(m) == pid]  # the worker leads its session
    for member in members:
        try:
            os.kill(member, sig)
        except ProcessLookupError:
            continue


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


class ExecutionEnvironment:
    def __init__(self, setup: WorkerSetup, scratch_root: Path) -> None:
        self.setup = setup
        self.isolation = "none"
        self.invocations = 0
        self.frozen = False
        self._scratch = Path(scratch_root) / f"env-{os.getpid()}-{id(self):x}"
        self._proc: subprocess.Popen[bytes] | ForkedProcess | None = None
        self.forked = False  # a fork of the zygote, not a fresh interpreter
        self.init_duration_s = 0.0  # process start to handler imported (Lambda's Init Duration)
        self._forwarder: threading.Thread | None = None
        self._output_lock = threading.Lock()
        self._requests: Any = None
        self._replies: Any = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(
        self, init_timeout_s: float, extra_env: Mapping[str, str] | None = None, zygote: Zygote | None = None
    ) -> None:
        """Start the worker and run its init phase (sandbox, handler import).

        ``extra_env`` is what differs between environments of one setup (credentials, log stream).
        With a ``zygote`` that accepts the environment, the worker is a fork of it (the
        interpreter and the third-party imports already done), else a fresh process.
        """
        started = time.monotonic()
        self._scratch.mkdir(parents=True, exist_ok=True)
        req_read, req_write = os.pipe()
        rep_read, rep_write = os.pipe()
        env = {**dict(self.setup.env), **dict(extra_env or {})}
        worker = "cachevault_tools.local.lambda_worker"
        command = [sys.executable, "-I", "-B", "-m", worker, str(req_read), str(rep_write)]

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                command,
                cwd=self.setup.code_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(req_read, rep_write),
                preexec_fn=_die_with_parent,  # only a prctl; forked by the spawner thread
                start_new_session=True,
            )

        try:
            if zygote is not None and zygote.accepts(env):
                self._proc = zygote.spawn(str(self.setup.code_dir), env, req_read, rep_write)
                self.forked = True
            else:
                self._proc = _SPAWNER.run(spawn)
        finally:
            os.close(req_read)
            os.close(rep_write)
        self._requests = os.fdopen(req_write, "wb", buffering=0)
        self._replies = os.fdopen(rep_read, "rb", buffering=0)
        self._forwarder = threading.Thread(target=self._forward_output, name="lambda-output", daemon=True)
        self._forwarder.start()
        write_message(
            self._requests,
            {
                "handler": self.setup.handler,
                "layer_dirs": [str(d) for d in self.setup.layer_dirs],
                "tmp_mb": self.setup.tmp_mb,
                "read_only": self.setup.read_only,
                "no_redis": self.setup.no_redis,
                "isolation": self.setup.isolation,
                "fallback_tmp": str(self._scratch),
            },
        )
        ready = self._await(init_timeout_s, None)
        if ready.kind == "result" and isinstance(ready.body, dict) and ready.body.get("ready"):
            self.isolation = str(ready.body.get("isolation"))
            self.init_duration_s = time.monotonic() - started
            return
        self.kill()
        if ready.kind == "result" and isinstance(ready.body, dict) and "init_error" in ready.body:
            raise InitError(ready.body["init_error"])
        raise InitError({"errorType": "Runtime.Unknown", "errorMessage": f"init failed: {ready.kind} {ready.detail}"})

    def invoke(self, request: Mapping[str, Any], timeout_s: float | None, memory_mb: int | None) -> Outcome:
        self.thaw()
        self.invocations += 1
        try:
            write_message(self._requests, dict(request))
        except OSError as exc:
            return Outcome("exit", detail=f"the runtime could not take the request: {exc}")
        outcome = self._await(timeout_s, memory_mb)
        if outcome.kind != "result":
            return outcome
        self._drain_output()
        reply = outcome.body
        if "error" in reply:
            return Outcome("error", reply["error"])
        return Outcome("result", reply["result"])

    def _await(self, timeout_s: float | None, memory_mb: int | None) -> Outcome:
        assert self._proc is not None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        limit = None if memory_mb is None else memory_mb * 1024 * 1024
        while True:
            wait = POLL_S if limit is not None else 0.5
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    return Outcome("timeout")
                wait = min(wait, left)
            readable, _, _ = select.select([self._replies], [], [], wait)
            if readable:
                message = read_message(self._replies)
                if message is None:
                    code = self._proc.wait()
                    return Outcome("exit", detail=_exit_text(code))
                return Outcome("result", message)
            if limit is not None and tree_rss_bytes(self._proc.pid) > limit:
                self.kill()
                return Outcome("oom")
            if self._proc.poll() is not None and not select.select([self._replies], [], [], 0)[0]:
                return Outcome("exit", detail=_exit_text(self._proc.returncode))

    def _forward_output(self) -> None:
        """The worker's stdout/stderr to this process's (what Lambda sends to CloudWatch Logs).

        A thread reads continuously: a handler's threads may keep printing after it returns
        (unfrozen environments), and a full pipe would block them.
        """
        assert self._proc is not None and self._proc.stdout is not None and self._proc.stderr is not None
        streams = {self._proc.stdout.fileno(): "stdout", self._proc.stderr.fileno(): "stderr"}
        while streams:
            readable, _, _ = select.select(list(streams), [], [])
            for fd in readable:
                with self._output_lock:
                    data = os.read(fd, 1 << 16)
                    if not data:
                        del streams[fd]
                        continue
                    target = getattr(sys, streams[fd])
                    target.write(data.decode("utf-8", "replace"))
                    target.flush()
        self._proc.stdout.close()
        self._proc.stderr.close()

    def _drain_output(self, timeout_s: float = 5.0) -> None:
        """Wait until what the worker printed before replying has been forwarded (it flushes first)."""
        if self._proc is None or self._proc.stdout is None or self._proc.stderr is None:
            return
        fds = (self._proc.stdout.fileno(), self._proc.stderr.fileno())
        deadline = time.monotonic() + timeout_s
        while any(_pending(fd) for fd in fds) and time.monotonic() < deadline:
            time.sleep(0.001)
        with self._output_lock:  # a chunk read but not yet written
            pass

    @property
    def _spares_nodes(self) -> bool:
        # Redis allowed (a relaxation): the nodes a handler starts in their own session
        # (local.redis_process) belong to the local fleet, not to this environment.
        return not self.setup.no_redis

    def freeze(self) -> None:
        """SIGSTOP the worker and everything it started: no progress until :meth:`thaw`."""
        if self.alive and not self.frozen:
            assert self._proc is not None
            _signal_tree(self._proc.pid, signal.SIGSTOP, own_session_only=self._spares_nodes)
            self.frozen = True

    def thaw(self) -> None:
        if self.alive and self.frozen:
            assert self._proc is not None
            _signal_tree(self._proc.pid, signal.SIGCONT, own_session_only=self._spares_nodes)
        self.frozen = False

    def kill(self) -> None:
        """End the environment: the worker, what it started, its scratch directory."""
        if self._proc is not None:
            if self._proc.poll() is None:
                _signal_tree(self._proc.pid, signal.SIGKILL, own_session_only=self._spares_nodes)
            self._proc.wait()
        for stream in (self._requests, self._replies):
            if stream is not None:
                stream.close()
        self._requests = self._replies = None
        if self._forwarder is not None:
            # EOF once every holder of the pipes is gone; it closes them then.
            self._forwarder.join(timeout=1)
        self.frozen = False
        shutil.rmtree(self._scratch, ignore_errors=True)


def _pending(fd: int) -> int:
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf)
    except OSError:
        return 0
    return buf[0]


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal: {signal.Signals(-code).name.removeprefix('SIG').lower()}"
    return f"exit status {code}"

