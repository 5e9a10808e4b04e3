"""Verify's wait for replicas that followed the load (restore.steps.until_caught_up), on a fake clock."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cachevault.restore import steps


class FakeClock:
    """``time.monotonic``/``time.sleep`` for the steps module: sleeping advances the clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(steps, "time", fake)
    return fake


def _answers(*lags: dict[str, int | None]) -> Any:
    """A ``lagging`` callable giving these answers in turn, then the last one for ever."""
    queue: Iterator[dict[str, int | None]] = iter(lags)
    last: list[dict[str, int | None]] = [{}]

    def lagging() -> dict[str, int | None]:
        last[0] = next(queue, last[0])
        return last[0]

    return lagging


def test_in_sync_at_once_does_not_wait(clock: FakeClock) -> None:
    assert steps.until_caught_up(_answers({})) == {}
    assert clock.now == 1000.0


def test_a_replica_gaining_ground_is_waited_for_beyond_the_stall_bound(clock: FakeClock) -> None:
    # 300 polls of 0.1 s (30 s, twice the stall bound), each a little less behind, then in sync.
    gaining = [{"r1": 300 - i} for i in range(300)]
    assert steps.until_caught_up(_answers(*gaining, {}), stall_s=15.0) == {}
    assert clock.now == pytest.approx(1000.0 + 30.0)


def test_a_link_coming_up_counts_as_ground_gained(clock: FakeClock) -> None:
    down = [{"r1": None}] * 100  # 10 s down, then linked and catching up
    assert steps.until_caught_up(_answers(*down, {"r1": 50}, {"r1": 10}, {}), stall_s=15.0) == {}


def test_a_stalled_replica_is_given_up_after_the_stall_bound(clock: FakeClock) -> None:
    assert steps.until_caught_up(_answers({"r1": 40, "r2": 7}, {"r1": 40}), stall_s=15.0) == {"r1": 40}
    assert 1015.0 <= clock.now <= 1015.2


def test_a_link_that_stays_down_is_given_up(clock: FakeClock) -> None:
    assert steps.until_caught_up(_answers({"r1": None}), stall_s=15.0) == {"r1": None}


def test_the_whole_wait_is_bounded_even_while_gaining(clock: FakeClock) -> None:
    # A target still written to (not ours) keeps moving: behind, a little less, behind again...
    wobble = [{"r1": 100 if i % 2 else 90} for i in range(100_000)]
    assert steps.until_caught_up(_answers(*wobble), stall_s=15.0, max_s=60.0) in ({"r1": 90}, {"r1": 100})
    assert 1060.0 <= clock.now <= 1060.2
