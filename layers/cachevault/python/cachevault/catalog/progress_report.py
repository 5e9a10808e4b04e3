"""Progress of a restore or a copy, recorded part by part in the catalog for the CLI to show.

Each part (an RDB download, a shard load, an object copy) has one writer: the step doing
the work. Writes are throttled (at most one per ``interval_s``, plus the first and the
last); a failed write is logged and the work goes on, since progress is only for display.
"""

from __future__ import annotations

import time
from typing import Any

from cachevault.catalog.records import Catalog
from cachevault.core.handler import logger

RESTORE = "restore"
COPY = "copy"


class PartProgress:
    def __init__(
        self,
        catalog: Catalog,
        operation: str,
        subject: str,
        part: str,
        *,
        phase: str,
        total: int | None,
        unit: str = "bytes",
        interval_s: float = 1.0,
    ) -> None:
        self.catalog, self.operation, self.subject, self.part = catalog, operation, subject, part
        self.fields: dict[str, Any] = {"Phase": phase, "Unit": unit, "Total": total, "Done": 0}
        self.interval_s = interval_s
        self._last = 0.0

    def start(self, *, strict: bool = False) -> None:
        """``strict``: a failed write raises (when someone waits on what this write says)."""
        self._write(Status="running", Done=0, strict=strict)

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._write(Done=int(done))

    def finish(self, done: int) -> None:
        self._write(Status="done", Done=int(done))

    def fail(self, error: str) -> None:
        """The part failed: why, for whoever waits on it (a worker's exit code alone says nothing)."""
        self._write(Status="failed", Error=error[:1000])

    def _write(self, strict: bool = False, **fields: Any) -> None:
        self.fields.update(fields)
        self._last = time.monotonic()
        try:
            self.catalog.set_operation_progress(self.operation, self.subject, self.part, self.fields)
        except Exception:  # display only: never fail a restore or a copy over it
            if strict:
                raise
            logger.warning("progress not recorded", operation=self.operation, part=self.part, exc_info=True)
