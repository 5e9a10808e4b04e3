"""``sam build`` of a ``BuildMethod: makefile`` layer, for the local runtime.

sam build runs ``make build-<LogicalId> ARTIFACTS_DIR=<dir>`` in the layer's ContentUri and
deploys what lands in the artifacts dir; the local deployer does the same, so the local
Lambda runtime loads the layer as Lambda would: the built files (bytecode included,
layers/cachevault/Makefile), read-only, not the source tree. ``PYTHON`` is this
interpreter: the local runtime's stand-in for the function's runtime.

Builds are cached under ``~/.cache/cachevault/layer-build/`` by the source's content and the
interpreter's version, so a ``local up`` builds only after the layer changed. Concurrent
builds (parallel test workers) each build aside and the first to finish is kept. Older
builds are left in place (about 1.5 MB each): another checkout's stack may be running on one.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BUILD_TIMEOUT_S = 300.0


class LayerBuildError(RuntimeError):
    """The layer's Makefile failed, as ``sam build`` would report it."""


def cache_root() -> Path:
    return Path.home() / ".cache" / "cachevault" / "layer-build"


def source_digest(source: Path) -> str:
    """What the build depends on: every file's path and bytes (no bytecode), and the interpreter."""
    digest = hashlib.sha256(sys.version.encode())
    for path in sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(source)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_layer(source: Path, logical_id: str) -> Path:
    """The artifacts dir of ``make build-<logical_id>`` run in ``source`` (built now or cached)."""
    out = cache_root() / f"{logical_id}-{source_digest(source)}"
    if (out / ".built").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{out.name}.tmp-"))  # one per build, even in threads
    try:
        try:
            done = subprocess.run(
                ["make", "--no-print-directory", "-C", str(source), f"build-{logical_id}",
                 f"ARTIFACTS_DIR={aside}", f"PYTHON={sys.executable}"],
                capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except FileNotFoundError as exc:
            raise LayerBuildError(f"building layer {logical_id} needs `make` ({exc}), as `sam build` does") from exc
        except subprocess.TimeoutExpired as exc:
            raise LayerBuildError(f"make build-{logical_id} in {source} took over {BUILD_TIMEOUT_S:.0f} s") from exc
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip()[-2000:]
            raise LayerBuildError(f"make build-{logical_id} in {source} failed ({done.returncode}): {detail}")
        (aside / ".built").touch()
        try:
            aside.rename(out)
        except OSError:  # another process built the same content first: keep its copy
            if not (out / ".built").exists():
                raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return out
