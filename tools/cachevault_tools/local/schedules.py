"""Fires the template's schedules: moto stores EventBridge rules but never fires them.

``fire_schedule`` delivers one schedule now (what EventBridge would send to the target:
a ``Scheduled Event`` envelope, or the rule's ``Input``). ``ScheduleTicker`` is a
bounded, stoppable background thread that fires ``rate(...)``, ``cron(...)`` and
``at(...)`` schedules when they fall due on an injectable clock, so tests can advance
time instead of waiting for it.
"""

from __future__ import annotations

import calendar
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cachevault_tools.local.deployer import DeployedStack, ScheduleInfo

LOG = logging.getLogger(__name__)

Clock = Callable[[], datetime]


@dataclass
class FireResult:
    schedule: ScheduleInfo
    fired_at: datetime
    execution_arn: str | None = None  # state machine target
    payload: Any = None  # function target: the handler's result (or error payload)
    function_error: str | None = None


def find_schedule(stack: DeployedStack, name: str) -> ScheduleInfo:
    """By rule name, event key (``Events: <key>``) or SAM's ``<LogicalId><key>`` rule id."""
    for info in stack.schedules:
        if name in (info.name, info.event_id, f"{info.logical_id}{info.event_id}"):
            return info
    known = sorted(s.name for s in stack.schedules)
    raise KeyError(f"no schedule {name!r} in stack {stack.stack_name}; known: {known}")


def schedule_input(stack: DeployedStack, info: ScheduleInfo, when: datetime) -> str:
    """The payload the target receives (JSON text)."""
    if info.input is not None:
        return info.input
    if info.kind == "ScheduleV2":
        return "{}"  # EventBridge Scheduler sends no envelope
    rule_arn = f"arn:aws:events:{stack.region}:{stack.account_id}:rule/{info.name}"
    return json.dumps(
        {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": "Scheduled Event",
            "source": "aws.events",
            "account": stack.account_id,
            "time": when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": stack.region,
            "resources": [rule_arn],
            "detail": {},
        }
    )


def fire_schedule(stack: DeployedStack, schedule: str | ScheduleInfo, *, now: datetime | None = None) -> FireResult:
    """Deliver one firing of ``schedule`` to its target, now."""
    info = schedule if isinstance(schedule, ScheduleInfo) else find_schedule(stack, schedule)
    when = now or datetime.now(UTC)
    payload = schedule_input(stack, info, when)
    result = FireResult(schedule=info, fired_at=when)
    if info.target_is_state_machine:
        name = _execution_name(info.name, when)
        resp = stack.client("stepfunctions").start_execution(stateMachineArn=info.target_arn, name=name, input=payload)
        result.execution_arn = resp["executionArn"]
    else:
        resp = stack.client("lambda").invoke(FunctionName=info.target_arn, Payload=payload.encode())
        body = resp["Payload"].read().decode()
        try:
            result.payload = json.loads(body) if body else None
        except ValueError:
            result.payload = body
        result.function_error = resp.get("FunctionError")
    LOG.info("fired schedule %s -> %s", info.name, result.execution_arn or info.target_arn)
    return result


def _execution_name(schedule_name: str, when: datetime) -> str:
    # Execution names: <= 80 chars of [A-Za-z0-9_-], unique per state machine.
    base = re.sub(r"[^A-Za-z0-9_-]", "-", schedule_name)[:48]
    return f"{base}-{when.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


# --- expressions ----------------------------------------------------------------------

_RATE = re.compile(r"^rate\(\s*(\d+)\s+(minute|minutes|hour|hours|day|days)\s*\)$")
_AT = re.compile(r"^at\(\s*(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})\s*\)$")
_UNIT_S = {"minute": 60, "hour": 3600, "day": 86400}
_MONTHS = {name.upper(): i for i, name in enumerate(calendar.month_abbr) if name}
_DAYS = {"SUN": 1, "MON": 2, "TUE": 3, "WED": 4, "THU": 5, "FRI": 6, "SAT": 7}
_CRON_SEARCH_DAYS = 366 * 5  # a cron that matches nothing within five years never fires


def next_fire(expression: str, after: datetime) -> datetime | None:
    """The first firing time strictly after ``after`` (UTC), or None if there is none.

    ``rate(...)`` counts from ``after``; ``cron(...)`` uses EventBridge's six fields
    (minutes hours day-of-month month day-of-week year; ``?``, lists, ranges, steps,
    names; not ``L``, ``W`` or ``#``).
    """
    expression = expression.strip()
    after = after.astimezone(UTC)
    if m := _RATE.match(expression):
        period = int(m.group(1)) * _UNIT_S[m.group(2).rstrip("s")]
        if period <= 0:
            raise ValueError(f"rate must be positive: {expression}")
        return after + timedelta(seconds=period)
    if m := _AT.match(expression):
        at = datetime.fromisoformat(m.group(1)).replace(tzinfo=UTC)
        return at if at > after else None
    if expression.startswith("cron(") and expression.endswith(")"):
        return _next_cron(expression[5:-1].split(), after)
    raise ValueError(f"unsupported schedule expression: {expression}")


def _next_cron(fields: list[str], after: datetime) -> datetime | None:
    if len(fields) != 6:
        raise ValueError(f"cron needs 6 fields, got {len(fields)}: {fields}")
    minutes = _field(fields[0], 0, 59, {})
    hours = _field(fields[1], 0, 23, {})
    dom = _field(fields[2], 1, 31, {})
    months = _field(fields[3], 1, 12, _MONTHS)
    dow = _field(fields[4], 1, 7, _DAYS)
    years = _field(fields[5], 1970, 2199, {})
    start = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    day = start.replace(hour=0, minute=0)
    for _ in range(_CRON_SEARCH_DAYS):
        # EventBridge day-of-week: 1 = Sunday; Python weekday(): 0 = Monday.
        weekday = (day.weekday() + 1) % 7 + 1
        if day.year in years and day.month in months and day.day in dom and weekday in dow:
            for hour in sorted(hours):
                for minute in sorted(minutes):
                    candidate = day.replace(hour=hour, minute=minute)
                    if candidate >= start:
                        return candidate
        day += timedelta(days=1)
    return None


def _field(text: str, low: int, high: int, names: dict[str, int]) -> set[int]:
    if text in ("*", "?"):
        return set(range(low, high + 1))
    if any(c in text for c in "LW#"):
        raise ValueError(f"cron field {text!r}: L, W and # are not supported locally")
    values: set[int] = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            step = int(step_text)
        if part in ("*", ""):
            first, last = low, high
        elif "-" in part:
            a, b = part.split("-", 1)
            first, last = _value(a, names), _value(b, names)
        else:
            first = _value(part, names)
            last = high if step > 1 else first
        if not (low <= first <= high and low <= last <= high):
            raise ValueError(f"cron field {text!r} out of range {low}-{high}")
        values.update(range(first, last + 1, step))
    return values


def _value(text: str, names: dict[str, int]) -> int:
    return names[text.upper()] if text.upper() in names else int(text)


# --- the ticker -----------------------------------------------------------------------


class ScheduleTicker:
    """Fires due schedules; ``tick()`` is one bounded pass, ``start()`` runs it on a thread.

    Like EventBridge, a schedule that fell due several times while nobody looked fires
    once, and the next firing is computed from the current time (no backfill).
    """

    def __init__(
        self,
        stack: DeployedStack,
        *,
        clock: Clock | None = None,
        interval_s: float = 1.0,
        include_disabled: bool = False,
        fire: Callable[[DeployedStack, ScheduleInfo], FireResult] | None = None,
    ) -> None:
        self.stack = stack
        self.clock: Clock = clock or (lambda: datetime.now(UTC))
        self.interval_s = interval_s
        self._fire = fire or (lambda st, info: fire_schedule(st, info, now=self.clock()))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.fired: list[FireResult] = []
        self.errors: list[tuple[str, str]] = []
        self._due: dict[str, datetime | None] = {}
        now = self.clock()
        for info in stack.schedules:
            if not info.enabled and not include_disabled:
                continue
            try:
                self._due[info.name] = next_fire(info.expression, now)
            except ValueError as exc:
                LOG.warning("schedule %s will not tick: %s", info.name, exc)
                self.errors.append((info.name, str(exc)))

    def due(self) -> dict[str, datetime | None]:
        return dict(self._due)

    def tick(self) -> list[FireResult]:
        """Fire every schedule whose time has come, at most once each."""
        now = self.clock()
        results: list[FireResult] = []
        with self._lock:
            for info in self.stack.schedules:
                when = self._due.get(info.name)
                if when is None or when > now:
                    continue
                self._due[info.name] = next_fire(info.expression, max(now, when))
                try:
                    results.append(self._fire(self.stack, info))
                except Exception as exc:
                    LOG.exception("schedule %s failed to fire", info.name)
                    self.errors.append((info.name, str(exc)))
            self.fired.extend(results)
        return results

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cachevault-schedules", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> ScheduleTicker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
