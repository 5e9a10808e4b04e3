"""``python -m cachevault_tools.local.lambda_worker``: one Lambda execution environment.

Started by :mod:`cachevault_tools.local.lambda_sandbox` with exactly the function's environment
and the code directory as working directory. It first builds the sandbox Lambda gives a
function, then imports the handler (the init phase) and serves invocations one at a time
over two pipes (4-byte big-endian length + JSON), until the request pipe closes.

Sandbox, by preference a private mount namespace (root, or an unprivileged user namespace):
``/tmp`` a tmpfs of the function's ``EphemeralStorage`` (a write beyond it is ``ENOSPC``),
every other mount re-mounted read-only (``EROFS``). Where namespaces are unavailable
(``isolation`` reported back as ``audit``), a Python audit hook refuses writes outside the
environment's own temporary directory with ``EROFS`` and a write that would take it past
``EphemeralStorage`` with ``ENOSPC``. Either way an audit hook refuses to execute Redis
binaries (``FileNotFoundError``), as a Lambda has none.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import json
import os
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, BinaryIO

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
_MOUNT_OPTION_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
# Kernel file systems the runtime itself needs writable (/dev/null, /proc/self/...).
_KEEP_WRITABLE = ("/proc", "/sys", "/dev")
REDIS_BINARIES = frozenset(
    {
        "redis-server",
        "redis-cli",
        "redis-sentinel",
        "redis-check-rdb",
        "redis-check-aof",
        "redis-benchmark",
        "valkey-server",
        "valkey-cli",
        "valkey-sentinel",
        "valkey-check-rdb",
        "valkey-check-aof",
        "valkey-benchmark",
    }
)


# --- framing ----------------------------------------------------------------------------


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    # An unbuffered pipe returns what is there: a large message arrives in several reads.
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_message(stream: BinaryIO) -> Any:
    head = _read_exactly(stream, 4)
    if head is None:
        return None
    (size,) = struct.unpack(">I", head)
    body = _read_exactly(stream, size)
    return None if body is None else json.loads(body)


def write_message(stream: BinaryIO, message: Any) -> None:
    body = json.dumps(message).encode()
    view = memoryview(struct.pack(">I", len(body)) + body)
    while view:  # a raw pipe may take less than asked
        written = stream.write(view)
        view = view[written or 0 :]
    stream.flush()


# --- the sandbox ------------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.unshare.argtypes = [ctypes.c_int]
    return libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc: ctypes.CDLL, source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _enter_namespace(libc: ctypes.CDLL) -> None:
    if os.geteuid() == 0:
        _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        return
    uid, gid = os.geteuid(), os.getegid()
    _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare(CLONE_NEWUSER|CLONE_NEWNS)")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, flags to keep) of every mount, from /proc/self/mountinfo."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")
        flags = 0
        for option in fields[5].split(","):
            flags |= _MOUNT_OPTION_FLAGS.get(option, 0)
        found.append((point, flags))
    return found


def _code_paths_under_tmp(extra: list[str]) -> list[str]:
    """The code this environment runs that lives under /tmp (a checkout, a venv there).

    On Lambda the code is in /var/task and /opt, never under /tmp; here a checkout may be,
    and the private /tmp would hide it.
    """
    candidates = {os.path.realpath(p) for p in [*sys.path, sys.prefix, os.getcwd(), *extra] if p and os.path.isdir(p)}
    # The whole top-level directory (the checkout): read-only like everything outside /tmp.
    return sorted({"/tmp/" + p.split("/")[2] for p in candidates if p.startswith("/tmp/")})


def build_namespace(tmp_mb: int | None, read_only: bool, code_paths: list[str] | None = None) -> None:
    """Private mounts: everything read-only but /tmp, /tmp a tmpfs of ``tmp_mb`` MB.

    Code under /tmp (``_code_paths_under_tmp``) stays visible, read-only, inside the new /tmp.
    """
    libc = _libc()
    _enter_namespace(libc)
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    if read_only:
        for point, flags in _mount_points():
            if point.startswith(_KEEP_WRITABLE) and point != "/":
                continue
            try:
                _mount(libc, None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
            except OSError as exc:
                # A mount hidden under another (or gone) cannot be reached: nothing to write there.
                if exc.errno not in (errno.ENOENT, errno.EINVAL, errno.EACCES):
                    raise
    if tmp_mb is not None:
        # Held open across the tmpfs mount, then bound back at their own paths.
        keep = {path: os.open(path, os.O_RDONLY | os.O_DIRECTORY) for path in _code_paths_under_tmp(code_paths or [])}
        _mount(libc, "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_mb}m,mode=1777")
        for path, fd in keep.items():
            try:
                os.makedirs(path, exist_ok=True)
                _mount(libc, f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
                _mount(libc, None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
            finally:
                os.close(fd)


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class AuditGuard:
    """What the audit hook enforces in this process (Python code only: the namespace is the real fence).

    ``tmp_dir`` is the environment's own directory standing in for ``/tmp``: with
    ``read_only`` every write outside it is ``EROFS``; a literal ``/tmp`` path is refused
    (it would be shared with every other environment); a write that finds ``tmp_bytes``
    used is ``ENOSPC``.
    """

    def __init__(
        self, *, refuse_redis: bool, read_only: bool = False, tmp_dir: Path | None = None, tmp_bytes: int | None = None
    ) -> None:
        self.refuse_redis = refuse_redis
        self.read_only = read_only
        self.tmp_dir = tmp_dir.resolve() if tmp_dir is not None else None
        self.tmp_bytes = tmp_bytes
        self._inside = False

    @property
    def active(self) -> bool:
        return self.refuse_redis or self.read_only or self.tmp_dir is not None

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if self._inside:
            return
        if event in ("subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn"):
            if self.refuse_redis:
                self._check_exec(event, args)
            return
        path = self._written_path(event, args)
        if path is not None:
            self._inside = True
            try:
                self._check_write(path, check_space=event == "open")
            finally:
                self._inside = False

    def _check_exec(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "subprocess.Popen":
            executable, argv = args[0], args[1]
            names = [executable] if executable else []
            if isinstance(argv, str | bytes | os.PathLike):
                names.append(argv)
            elif argv:
                names.append(argv[0])
        else:
            names = [args[0]]
        for name in names:
            text = os.fsdecode(name)
            if os.path.basename(text) in REDIS_BINARIES or os.path.basename(os.path.realpath(text)) in REDIS_BINARIES:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", text)

    @staticmethod
    def _written_path(event: str, args: tuple[Any, ...]) -> Any:
        if event == "open":
            path, mode, flags = args
            writing = bool(flags & _WRITE_FLAGS) if mode is None else any(c in str(mode) for c in "wax+")
            return path if writing and path is not None and not isinstance(path, int) else None
        if event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.utime", "os.chown"):
            return args[0]
        if event in ("os.rename", "os.replace", "os.link", "os.symlink"):
            return args[1]
        return None

    def _check_write(self, path: Any, *, check_space: bool) -> None:
        if isinstance(path, int):
            return
        text = os.path.abspath(os.fsdecode(path))
        if text.startswith("/dev/"):
            return
        real = Path(os.path.realpath(text))
        inside = self.tmp_dir is not None and (real == self.tmp_dir or self.tmp_dir in real.parents)
        if self.read_only and not inside:
            raise OSError(errno.EROFS, "Read-only file system", text)
        if self.tmp_dir is not None and not inside and (text == "/tmp" or text.startswith("/tmp/")):
            raise OSError(errno.EROFS, "Read-only file system (no private /tmp here: use TMPDIR)", text)
        if inside and check_space and self.tmp_bytes is not None:
            used = sum(f.stat().st_size for f in self.tmp_dir.rglob("*") if f.is_file())  # type: ignore[union-attr]
            if used >= self.tmp_bytes:
                raise OSError(errno.ENOSPC, "No space left on device", text)


def setup_sandbox(setup: dict[str, Any]) -> str:
    """Build the sandbox ``setup`` asks for; returns the isolation used (namespace/audit/none)."""
    tmp_mb = setup.get("tmp_mb")
    read_only = bool(setup.get("read_only"))
    isolation = "none"
    if (read_only or tmp_mb is not None) and setup.get("isolation") == "audit":
        isolation = "audit"
    elif read_only or tmp_mb is not None:
        try:
            build_namespace(tmp_mb, read_only, [os.environ.get("LAMBDA_TASK_ROOT", ""), *setup.get("layer_dirs", [])])
            isolation = "namespace"
        except OSError:
            isolation = "audit"
    audit = isolation == "audit"
    # No namespace: the runtime's per-environment directory stands in for /tmp.
    tmp_dir = Path(setup["fallback_tmp"]) if audit and tmp_mb is not None else None
    if tmp_mb is not None:
        tmp = str(tmp_dir) if tmp_dir is not None else "/tmp"
        os.environ["TMPDIR"] = tmp
        tempfile.tempdir = tmp
    guard = AuditGuard(
        refuse_redis=bool(setup.get("no_redis")),
        read_only=audit and read_only,
        tmp_dir=tmp_dir,
        tmp_bytes=tmp_mb * 1024 * 1024 if tmp_dir is not None else None,
    )
    if guard.active:
        sys.addaudithook(guard)
    return isolation


# --- the runtime loop -------------------------------------------------------------------


class LambdaContext:
    """The subset of the Lambda context object handlers and Powertools read."""

    def __init__(self, request: dict[str, Any]) -> None:
        env = os.environ
        self.function_name = env.get("AWS_LAMBDA_FUNCTION_NAME", "")
        self.function_version = env.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        self.invoked_function_arn = request["arn"]
        self.memory_limit_in_mb = int(env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"))
        self.aws_request_id = request["request_id"]
        self.log_group_name = env.get("AWS_LAMBDA_LOG_GROUP_NAME", "")
        self.log_stream_name = env.get("AWS_LAMBDA_LOG_STREAM_NAME", "")
        self.identity = None
        self.client_context = None
        self.tenant_id = None
        self._deadline = time.monotonic() + request["remaining_ms"] / 1000

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def error_payload(exc: BaseException, *, skip_frames: int = 1) -> dict[str, Any]:
    tb = exc.__traceback__
    for _ in range(skip_frames):  # the trace starts in the handler, as Lambda's does
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    return {"errorType": type(exc).__name__, "errorMessage": str(exc), "stackTrace": traceback.format_tb(tb)}


def load_handler(handler: str, layer_dirs: list[str]) -> Any:
    """Import ``module.attr`` with the code dir first and the layers next, as on Lambda."""
    task_root = os.environ.get("LAMBDA_TASK_ROOT", os.getcwd())
    sys.path[:0] = [task_root, *layer_dirs]
    module_name, _, attr = handler.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _ImportModuleError(f"Unable to import module '{module_name}': {exc}") from exc
    function = getattr(module, attr, None)
    if not callable(function):
        raise _HandlerNotFound(f"Handler '{attr}' missing on module '{module_name}'")
    return function


class _ImportModuleError(Exception):
    error_type = "Runtime.ImportModuleError"


class _HandlerNotFound(Exception):
    error_type = "Runtime.HandlerNotFound"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    requests = os.fdopen(int(args[0]), "rb", buffering=0)
    replies = os.fdopen(int(args[1]), "wb", buffering=0)
    # Ctrl-C in a terminal reaches the whole process group: the runtime decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup = read_message(requests)
    if setup is None:
        return 0
    try:
        isolation = setup_sandbox(setup)
        handler = load_handler(setup["handler"], setup.get("layer_dirs") or [])
    except Exception as exc:
        payload = error_payload(exc, skip_frames=0)
        payload["errorType"] = getattr(exc, "error_type", payload["errorType"])
        write_message(replies, {"init_error": payload})
        return 1
    write_message(replies, {"ready": True, "isolation": isolation, "pid": os.getpid()})
    while True:
        request = read_message(requests)
        if request is None:
            return 0
        try:
            result = handler(request["event"], LambdaContext(request))
        except Exception as exc:
            reply: dict[str, Any] = {"error": error_payload(exc)}
        else:
            try:
                reply = {"result": json.dumps(result)}
            except (TypeError, ValueError) as exc:
                message = f"Unable to marshal response: {exc}"
                reply = {"error": {"errorType": "Runtime.MarshalError", "errorMessage": message, "stackTrace": []}}
            result = None
        # What the handler printed is in the pipes before the reply: the runtime forwards it first.
        sys.stdout.flush()
        sys.stderr.flush()
        write_message(replies, reply)


if __name__ == "__main__":
    raise SystemExit(main())
