"""Adaptive concurrency as a pure AIMD rule: additive increase, multiplicative decrease.

The limit (requests in flight) grows by one per "window" of good answers — `1/limit` per
answer, so by one per round trip of the whole window — while the limit is actually used,
and is multiplied by `backoff` on an overload signal: a 429, a 503, a timeout, or a latency
above `tolerance` x the baseline (and more than `slack` above it). The baseline is the
lowest latency seen, drifting slowly up towards recent good latencies so that it follows a
receiver that got slower for good. It stays within `floor`..`ceiling`.

One decrease per congestion event: every request carries the `epoch` it started in, and
only a signal from a request started in the current epoch decreases the limit (and starts
a new epoch). A burst of 30 timeouts from one overload halves once, not 30 times; and only
answers to requests started in the current epoch grow the limit.
"""

from __future__ import annotations

import math
from typing import final

from daemon.config.limits import AdaptiveConfig

__all__ = ["Aimd"]

BASELINE_DRIFT = 0.01  # share of the gap a good latency above the baseline pulls it up by


@final
class Aimd:
    """The limit of one sink; `on_result` for each finished request. Pure: no clock, no I/O."""

    __slots__ = ("_config", "baseline", "epoch", "limit")

    def __init__(self, config: AdaptiveConfig) -> None:
        self._config = config
        self.limit = float(config.initial or config.floor)
        self.baseline = math.inf
        self.epoch = 0

    def __repr__(self) -> str:
        return f"<Aimd [limit {self.current}, baseline {self.baseline * 1000:.1f}ms, epoch {self.epoch}]>"

    @property
    def current(self) -> int:
        """Requests allowed in flight now."""
        return int(self.limit)

    def congested(self, latency: float) -> bool:
        """Is `latency` an overload signal against the baseline?"""
        if math.isinf(self.baseline):
            return False
        config = self._config
        return latency > max(self.baseline * config.tolerance, self.baseline + config.slack)

    def on_result(self, latency: float, *, overloaded: bool, epoch: int, in_flight: int) -> bool:
        """Learn one request's result; True when `current` changed.

        `overloaded`: the answer itself said so (429, 503, timeout). `epoch`: `self.epoch` when
        the request started. `in_flight`: requests in flight when it ended, itself included.
        """
        before = self.current
        config = self._config
        if overloaded or self.congested(latency):
            if epoch == self.epoch:
                self.limit = max(float(config.floor), self.limit * config.backoff)
                self.epoch += 1
            return self.current != before
        if latency < self.baseline:
            self.baseline = latency
        else:
            self.baseline += (latency - self.baseline) * BASELINE_DRIFT
        # Only a limit that is being used may grow, and only on answers to requests started
        # under the current limit (those in flight at a decrease say nothing about the new one).
        if in_flight >= self.current and epoch == self.epoch:
            self.limit = min(float(config.ceiling), self.limit + 1.0 / self.limit)
        return self.current != before
