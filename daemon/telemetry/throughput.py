"""Events received and delivered per second, for `ferry ctl status` and `top`.

A task samples two cumulative counters every `interval` seconds; the rate is the
change across the samples of the last `window` seconds. A counter that goes
down (a sink replaced by a reload starts again from 0) counts as no change, so
rates never turn negative.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import final

import trio


@final
class Throughput:
    """Rates over the last minute of `read()` = (events received, deliveries delivered)."""

    def __init__(
        self, read: Callable[[], tuple[int, int]], *, interval: float = 5.0, window: float = 60.0
    ) -> None:
        self._read = read
        self._interval = interval
        self._samples: deque[tuple[float, int, int]] = deque(maxlen=int(window / interval) + 1)
        self._last: tuple[int, int] | None = None
        self._totals = (0, 0)

    def sample(self, now: float) -> None:
        """Record the counters as of `now` (seconds on any monotonic clock)."""
        received, delivered = self._read()
        if self._last is not None:
            grew = (max(0, received - self._last[0]), max(0, delivered - self._last[1]))
            self._totals = (self._totals[0] + grew[0], self._totals[1] + grew[1])
        self._last = (received, delivered)
        self._samples.append((now, *self._totals))

    def rates(self) -> tuple[float | None, float | None]:
        """(received/s, delivered/s) over the sampled window; None until two samples exist."""
        if len(self._samples) < 2:
            return None, None
        (t0, r0, d0), (t1, r1, d1) = self._samples[0], self._samples[-1]
        span = t1 - t0
        return (r1 - r0) / span, (d1 - d0) / span

    async def run(self) -> None:
        """Sample every `interval` until cancelled."""
        while True:
            self.sample(trio.current_time())
            await trio.sleep(self._interval)
