"""The circuit breaker as a pure state machine: every method takes `now`, nothing sleeps.

    CLOSED ──(N consecutive failures, or failure share >= rate over window)──> OPEN
    OPEN ──(cool_down elapsed: the next `allow` hands out the one probe)──> HALF_OPEN
    HALF_OPEN ──(probe succeeded)──> CLOSED        HALF_OPEN ──(probe failed)──> OPEN again

Only the probe decides in HALF_OPEN; results of requests admitted while it was still CLOSED
that arrive after it opened are ignored (they say nothing about the service now). A probe
given up without being sent (`cancel_probe`) lets the next caller probe instead.

Used by `actors/sink/guard.py`, which keeps one breaker per target URL of a sink; see
docs/limits.md for what a failure is and what waits while a breaker is open.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from typing import final

from daemon.config.limits import BreakerConfig

__all__ = ["Admit", "Breaker", "State"]


class State(enum.IntEnum):
    """A breaker's state; the value is the `ferry.breaker.state` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class Admit(enum.Enum):
    """What `Breaker.allow` says about one request."""

    YES = "yes"
    PROBE = "probe"  # the one request that decides whether the breaker closes
    NO = "no"


@final
class Breaker:
    """One breaker; see the module docstring."""

    __slots__ = ("_config", "_consecutive", "_failed", "_probing", "_window", "opened_at", "opens", "state")

    def __init__(self, config: BreakerConfig) -> None:
        self._config = config
        self.state = State.CLOSED
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()  # (ended at, failed) within `window`
        self._failed = 0  # failures in `_window`
        self._probing = False
        self.opened_at = -math.inf
        self.opens = 0

    def __repr__(self) -> str:
        return f"<Breaker [{self.state.label}, {self._consecutive} consecutive failure(s)]>"

    def allow(self, now: float) -> Admit:
        """May a request go now? A PROBE answer is the one probe: report it with `record(probe=True)`."""
        if self.state is State.CLOSED:
            return Admit.YES
        if self.state is State.OPEN:
            if now < self.retry_at:
                return Admit.NO
            self.state = State.HALF_OPEN
        if self._probing:
            return Admit.NO
        self._probing = True
        return Admit.PROBE

    @property
    def retry_at(self) -> float:
        """When an open breaker lets its probe through (-inf unless open)."""
        return self.opened_at + self._config.cool_down if self.state is State.OPEN else -math.inf

    def cancel_probe(self) -> None:
        """The probe was not sent after all: the next `allow` may hand it out again."""
        self._probing = False

    def record(self, now: float, *, failed: bool, probe: bool = False) -> bool:
        """Learn one request's result; True when the state changed."""
        if probe:
            self._probing = False
            if failed:
                self._open(now)
            else:
                self._close()
            return True
        if self.state is not State.CLOSED:
            return False
        self._consecutive = self._consecutive + 1 if failed else 0
        window, horizon = self._window, now - self._config.window
        window.append((now, failed))
        self._failed += failed
        while window and window[0][0] < horizon:
            self._failed -= window.popleft()[1]
        config = self._config
        if self._consecutive >= config.failures or (
            len(window) >= config.min_requests and self._failed >= config.rate * len(window)
        ):
            self._open(now)
            return True
        return False

    def _open(self, now: float) -> None:
        self.state, self.opened_at = State.OPEN, now
        self.opens += 1

    def _close(self) -> None:
        self.state = State.CLOSED
        self._consecutive, self._failed = 0, 0
        self._window.clear()
