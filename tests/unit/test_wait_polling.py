"""How often ``--wait`` polls (ControlPlane.poll_pause): soon at first, never more often than 0.2 s."""

from __future__ import annotations

import time

from cachevault.ops.control_plane import poll_pause


def _pause_after(elapsed_s: float, longest_s: float = 0.5) -> float:
    return poll_pause(time.monotonic() - elapsed_s, longest_s)


def test_a_short_wait_is_polled_often_and_a_long_one_at_the_old_rate() -> None:
    assert 0.2 <= _pause_after(0.0) < 0.21  # a command that ends in 3 s is seen done within 0.2 s
    assert 0.2 <= _pause_after(3.0) < 0.21
    assert 0.49 < _pause_after(10.0) <= 0.5  # from 10 s on: the former fixed 0.5 s
    assert 0.49 < _pause_after(3600.0) <= 0.5
    assert 0.99 < _pause_after(3600.0, longest_s=1.0) <= 1.0


def test_polls_in_the_first_minute_stay_few() -> None:
    elapsed, polls = 0.0, 0
    while elapsed < 60.0:
        elapsed += _pause_after(elapsed)
        polls += 1
    assert polls <= 60 / 0.2  # never faster than 5 per second
    assert polls > 60 / 0.5  # and sooner than the fixed 0.5 s at the start
