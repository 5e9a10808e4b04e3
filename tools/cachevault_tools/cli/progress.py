"""Progress of long jobs: a rich bar per part (percent, amount, rate, ETA) on a terminal,
plain lines every few seconds otherwise (CI logs). Always on stderr: stdout stays the result.

The parts come from what the product records: a capture's shards (the capture progress
table merged into NodeSnapshots by describe), a restore's downloads and shard loads and a
copy's objects (``progress_report.PartProgress`` rows). ``capture_parts``,
``restore_parts`` and ``copy_parts`` turn those records into ``Part`` values; a
``ProgressView`` draws them. Sizes and rates are IEC (``units``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from cachevault_tools.cli.units import iec_bytes, iec_rate

PLAIN_EVERY_S = 5.0


@dataclass
class Part:
    key: str
    label: str
    done: int
    total: int | None  # None: not known yet (a capture's size before it ends)
    unit: str = "bytes"  # or "keys"
    status: str = "running"
    rate: float | None = None  # the recorder's own rate, used when no rate was observed here


def amount(n: float, unit: str) -> str:
    return iec_bytes(n) if unit == "bytes" else f"{int(n):,} {unit}"


def rate_text(per_second: float | None, unit: str) -> str:
    if per_second is None:
        return ""
    return iec_rate(per_second) if unit == "bytes" else f"{per_second:,.0f} {unit}/s"


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds + 0.5)
    return f"ETA {seconds // 60}:{seconds % 60:02d}"


# ------------------------------------------------------------------ records -> parts
def expected_capture_sizes(catalog: Any, record: dict[str, Any]) -> dict[str, int]:
    """NodeGroupId -> the size of that shard in the cache's latest available snapshot.

    A capture's size is known only when it ends (diskless SYNC streams without a length);
    the same shard's previous RDB is the estimate that gives a running capture its percent
    and ETA. Without one (a first snapshot, another shard count) the bar shows bytes and rate.
    """
    cache = record.get("ReplicationGroupId")
    if not cache:
        return {}
    try:
        previous = [
            s
            for s in catalog.all_snapshots(cache=cache)
            if s.get("SnapshotStatus") == "available" and s.get("SnapshotName") != record.get("SnapshotName")
        ]
    except Exception:  # an estimate only: never fail a wait over it
        return {}
    if not previous:
        return {}
    latest = max(previous, key=lambda s: s.get("SnapshotCreateTime") or "")
    sizes = {n.get("NodeGroupId"): _int(n.get("Size") or n.get("CacheSize")) for n in latest.get("NodeSnapshots", [])}
    return {k: v for k, v in sizes.items() if k and v}


def capture_parts(record: dict[str, Any], expected: dict[str, int] | None = None) -> list[Part]:
    """One part per shard of a snapshot (describe_snapshot's NodeSnapshots); ``expected`` sizes
    (expected_capture_sizes) give a running capture a total."""
    expected = expected or {}
    parts = []
    for node in record.get("NodeSnapshots", []):
        status = node.get("CaptureStatus") or ("done" if record.get("SnapshotStatus") == "available" else "pending")
        size = _int(node.get("Size")) or (_int(node.get("CacheSize")) if status == "done" else None)
        done = size if status == "done" and size else _int(node.get("BytesCaptured")) or 0
        seconds = node.get("CaptureSeconds")
        rate = done / float(seconds) if status == "done" and seconds else _int(node.get("RateBytesPerSecond"))
        parts.append(
            Part(
                key=f"capture-{node.get('NodeGroupId')}",
                label=f"capture shard {node.get('NodeGroupId')}",
                done=done,
                total=size if status == "done" else _estimate(done, expected.get(node.get("NodeGroupId"))),
                status=status,
                rate=float(rate) if rate else None,
            )
        )
    return parts


def _estimate(done: int, expected: int | None) -> int | None:
    # A capture larger than its estimate keeps a bar just short of full until its real end.
    return max(expected, int(done * 1.01) + 1) if expected else None


def operation_parts(progress: dict[str, dict[str, Any]]) -> list[Part]:
    """Rows recorded by progress_report.PartProgress, in order (downloads, then loads or copies)."""
    order = {"download": 0, "load": 1, "copy": 2}
    rows = sorted(progress.items(), key=lambda kv: (order.get(kv[1].get("Phase", ""), 9), kv[0]))
    parts = []
    for key, row in rows:
        phase = row.get("Phase", key.split("-")[0])
        index = key.rsplit("-", 1)[-1]
        # A seed's part is its node's (restore.seed.progress_part): name the node, not a shard.
        label = f"seed of {key[5:]}" if key.startswith("seed-") else f"{phase} shard {index}"
        parts.append(
            Part(
                key=key,
                label=label,
                done=_int(row.get("Done")) or 0,
                total=_int(row.get("Total")),
                unit=row.get("Unit", "bytes"),
                status=row.get("Status", "running"),
            )
        )
    return parts


def restore_parts(cache: dict[str, Any]) -> list[Part]:
    return operation_parts(cache.get("RestoreProgress") or {})


def copy_parts(result: dict[str, Any]) -> list[Part]:
    return operation_parts(result.get("CopyProgress") or {})


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------ the view
class _Observed:
    """Rate and ETA of one part from what this process has seen of it."""

    def __init__(self, done: int) -> None:
        self.t0, self.done0 = time.monotonic(), done
        self.final_rate: float | None = None
        self.finished = False

    def rate(self, part: Part) -> float | None:
        if self.finished:  # frozen at the end: a finished part's rate does not decay
            return self.final_rate
        elapsed = time.monotonic() - self.t0
        rate = (part.done - self.done0) / elapsed if elapsed >= 1.0 and part.done > self.done0 else part.rate
        if part.status == "done":
            self.finished, self.final_rate = True, rate
        return rate

    def eta(self, part: Part) -> float | None:
        rate = self.rate(part)
        if part.status == "done" or not part.total or not rate:
            return None
        return max(0.0, (part.total - part.done) / rate)


class ProgressView:
    """``show(status, parts)`` on every poll; ``close()`` at the end (also on errors)."""

    def __init__(self, title: str, *, stream: TextIO | None = None, rich: bool | None = None) -> None:
        self.title = title
        self.stream = stream or sys.stderr
        if rich is None:
            rich = sys.stdout.isatty() and self.stream.isatty()
        self._bars = _RichBars(self.stream) if rich and _rich_available() else None
        self._seen: dict[str, _Observed] = {}
        self._status: str | None = None
        self._last_plain = 0.0
        self._plain_state: dict[str, str] = {}

    def show(self, status: str, parts: list[Part]) -> None:
        for part in parts:
            self._seen.setdefault(part.key, _Observed(part.done))
        if status != self._status:
            self._status = status
            self._say(f"{self.title}: {status}")
        if self._bars is not None:
            self._bars.update(parts, self._seen)
        else:
            self._plain(parts)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    def _say(self, text: str) -> None:
        if self._bars is not None:
            self._bars.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    def _plain(self, parts: list[Part]) -> None:
        """A line per part when it finishes or changes status, else at most every PLAIN_EVERY_S."""
        now = time.monotonic()
        periodic = now - self._last_plain >= PLAIN_EVERY_S
        printed = False
        for part in parts:
            changed = self._plain_state.get(part.key) != part.status
            if changed or (periodic and part.status != "done"):
                print(describe_part(part, self._seen[part.key]), file=self.stream, flush=True)
                self._plain_state[part.key] = part.status
                printed = True
        if printed or periodic:
            self._last_plain = now


def describe_part(part: Part, seen: _Observed | None = None) -> str:
    """``load shard 0001: 45% 450,000 of 1,000,000 keys, 90,000 keys/s, ETA 0:06``."""
    seen = seen or _Observed(part.done)
    if part.total:
        done = amount(part.done, part.unit) if part.unit == "bytes" else f"{part.done:,}"
        what = f"{min(100.0, 100.0 * part.done / part.total):3.0f}% {done} of {amount(part.total, part.unit)}"
    else:
        what = amount(part.done, part.unit)
    bits = [what, rate_text(seen.rate(part), part.unit), eta_text(seen.eta(part))]
    text = ", ".join(b for b in bits if b)
    suffix = "" if part.status in ("running", "done") else f" ({part.status})"
    return f"{part.label}: {'done ' if part.status == 'done' else ''}{text}{suffix}"


def _rich_available() -> bool:
    try:
        import rich.progress  # noqa: F401
    except ImportError:  # the CLI without the [local]/[dev] extras: plain lines still work
        return False
    return True


class _RichBars:
    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self.console = Console(file=stream)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[amount]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[eta]}"),
            console=self.console,
            refresh_per_second=4,
        )
        self.progress.start()
        self.tasks: dict[str, Any] = {}

    def update(self, parts: list[Part], seen: dict[str, _Observed]) -> None:
        for part in parts:
            observed = seen[part.key]
            fields = {
                "amount": amount(part.done, part.unit) + (f" / {amount(part.total, part.unit)}" if part.total else ""),
                "rate": rate_text(observed.rate(part), part.unit),
                "eta": eta_text(observed.eta(part)),
            }
            total = part.total if part.total else None
            if part.key not in self.tasks:
                self.tasks[part.key] = self.progress.add_task(part.label, total=total, completed=part.done, **fields)
            self.progress.update(self.tasks[part.key], total=total, completed=part.done, **fields)

    def stop(self) -> None:
        self.progress.stop()
