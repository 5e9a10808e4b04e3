"""How long a state machine waits before polling a long operation again.

A standard execution fails at 25,000 history events, and every poll costs ~9 of them
(Wait 2, Task 5, Choice 2), shared by every Map iteration of the execution. A fixed 2 s
poll of 16 shards would pass that limit in under 6 minutes. Waiting a fraction of the
time the operation has run so far (capped) keeps the number of polls logarithmic at first
and ~4 per hour after: a 24-hour capture of 16 shards stays under 20,000 events
(tests/unit/test_state_limits.py), while a short capture is still seen done within ~20 %
of its duration.
"""

from __future__ import annotations

import time

BACKOFF_FRACTION = 0.2  # wait 1/5 of the time elapsed so far
MAX_POLL_SECONDS = 900  # ...but never more than 15 minutes


def next_poll_seconds(started_epoch: float | None, base_seconds: int, now: float | None = None) -> int:
    """Seconds until the next poll of an operation that started at ``started_epoch``."""
    base = max(1, int(base_seconds))
    if started_epoch is None:
        return base
    elapsed = max(0.0, (time.time() if now is None else now) - float(started_epoch))
    return int(min(MAX_POLL_SECONDS, max(base, elapsed * BACKOFF_FRACTION)))
