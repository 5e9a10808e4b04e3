"""Which files product code (the layer and functions/, not the local emulator, moto or botocore)
touches, recorded by a Python audit hook: on AWS a step may write only its own /tmp."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from cachevault import storage
from cachevault.local.environment import find_template

LAYER = str(Path(storage.__file__).resolve().parent) + os.sep
PRODUCT_CODE = (LAYER, str(Path(find_template()).parent / "functions") + os.sep)
NOT_PRODUCT = (LAYER + "local" + os.sep, os.sep + "moto" + os.sep, os.sep + "botocore" + os.sep)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class FileAudit:
    """What product code did to files while ``active``: (event, path) pairs."""

    def __init__(self) -> None:
        self.active = False
        self.writes: list[tuple[str, str]] = []
        self.opened: list[str] = []

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or not event.startswith(("open", "os.", "shutil.")):
            return
        if event == "open":
            path, mode, flags = args
            if not isinstance(path, (str, bytes, os.PathLike)):
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            )
            paths = [path]
        elif event in ("os.mkdir", "os.remove", "os.rmdir"):
            if args[-1] is not None:
                return  # relative to a directory fd: shutil.rmtree inside a tree its own event names
            writing, paths = True, [args[0]]
        elif event == "shutil.rmtree":
            writing, paths = True, [args[0]]
        elif event in ("os.rename", "os.replace", "os.link", "os.symlink"):
            writing, paths = True, [args[0], args[1]]
        else:
            return
        if not self._from_product():
            return
        for p in paths:
            text = os.fsdecode(p) if not isinstance(p, int) else str(p)
            if writing:
                self.writes.append((event, os.path.abspath(text)))
            else:
                self.opened.append(os.path.abspath(text))

    @staticmethod
    def _from_product() -> bool:
        """Whether the innermost non-stdlib frame is product code (not the emulator, moto, botocore)."""
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if name.startswith(NOT_PRODUCT) or any(part in name for part in NOT_PRODUCT[1:]):
                return False
            if name.startswith(PRODUCT_CODE):
                return True
            frame = frame.f_back
        return False


AUDIT = FileAudit()
sys.addaudithook(AUDIT.hook)  # cannot be removed; inert unless AUDIT.active
