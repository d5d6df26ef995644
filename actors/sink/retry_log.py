"""Retry warnings, summarised: at most one warning per sink per `SUMMARY_INTERVAL`, the detail at debug.

Why:
    A retry is not a final outcome, and a sink failing against a large backlog retries
    thousands of times a second: one warning per failed attempt wrote ~2,200 lines/s (65 MB in
    five minutes with 100k deliveries pending), burying everything else and costing ~15 us of
    CPU a line. What an operator needs is that the sink is failing, how much, and why.

Shape (logger `ferry.sink`):
    `delivery will be retried` (warning). The first failed attempt after a quiet interval is
    logged at once; the attempts failing during the `SUMMARY_INTERVAL` (10 s) after it are
    counted and logged in one line when that interval ends, and so on while the failures go on.
    Fields: `sink`; `deliveries` (rescheduled) and `attempts` (failed requests) in the line's
    period; `by_error`, those deliveries counted by HTTP status (`"503"`) or, without one, by
    error text (at most `MAX_KINDS` kinds, the rest under `"other"`); the period's first failure
    as the example (`first_delivery_id`, `attempt`, `status`, `error`); `interval_s`, the period
    the line covers (0 for the line logged at once). A sink that stops leaves no count unlogged:
    `flush()` logs the rest.

    `attempt failed` (debug): one line per failed attempt, with its `deliveries`,
    `delivery_ids` (at most `IDS_PER_LINE`), `attempt`, `status` and `error`. Off unless
    `[telemetry] log_level = "debug"`, and then not built at all.

Final outcomes (delivered, dead) are not summarised: see `actors.sink.outcomes`.

Clock: trio's (`trio.current_time()`), so tests run on `trio.testing.MockClock`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any, Final, final

import trio

from actors.sink.commit import Finished
from actors.sink.outcomes import IDS_PER_LINE

log = logging.getLogger("ferry.sink")

SUMMARY_INTERVAL: Final = 10.0
"""Seconds between two retry warnings of one sink."""
MAX_KINDS: Final = 10
"""Most error kinds counted apart in one line (`by_error`); the rest count as `other`."""
_ERROR_KEY_CHARS: Final = 80


@final
class RetryLog:
    """One sink's retry warnings; see the module docstring.

    `note(entries)` after each commit of outcomes; `run()` in the sink's nursery logs each
    period's line when it ends; `close()` stops it and `flush()` logs what is left.
    """

    def __init__(self, sink: str, interval: float = SUMMARY_INTERVAL) -> None:
        self.sink = sink
        self._interval = interval
        self._quiet_until = -float("inf")  # the next line may be logged at once from then on
        self._since = 0.0  # start of the period being counted
        self._deliveries = 0
        self._attempts = 0
        self._kinds: Counter[str] = Counter()
        self._example: dict[str, Any] | None = None
        self._pending = trio.Event()
        self._scope = trio.CancelScope()
        self.lines = 0

    def __repr__(self) -> str:
        return f"<RetryLog {self.sink} [counted: {self._deliveries}, lines: {self.lines}]>"

    def note(self, entries: Sequence[Finished]) -> None:
        """Count the retries among committed attempts; log at once if the sink was quiet."""
        detail = log.isEnabledFor(logging.DEBUG)
        for entry in entries:
            error, retried = entry.error, len(entry.outcomes.retry)
            if not retried or error is None:
                continue
            first = entry.batch[0]
            example = {
                "first_delivery_id": first.id,
                "attempt": first.attempts + 1,
                "status": error.status,
                "error": str(error),
            }
            if detail:
                ids = [due.id for due in entry.batch[:IDS_PER_LINE]]
                fields = {"sink": self.sink, "deliveries": retried, "delivery_ids": ids} | example
                log.debug("attempt failed", extra={"fields": fields})
            if self._attempts == 0:
                self._since = trio.current_time()
                self._example = example
            self._attempts += 1
            self._deliveries += retried
            key = str(error.status) if error.status is not None else str(error)[:_ERROR_KEY_CHARS]
            if key not in self._kinds and len(self._kinds) >= MAX_KINDS:
                key = "other"
            self._kinds[key] += retried
        if self._attempts:
            if trio.current_time() >= self._quiet_until:
                self.flush()
            else:
                self._pending.set()

    async def run(self) -> None:
        """Log each period's line when its interval ends; returns once `close()` is called."""
        with self._scope:
            while True:
                await self._pending.wait()
                self._pending = trio.Event()
                await trio.sleep_until(self._quiet_until)
                self.flush()

    def close(self) -> None:
        """Stop `run`; later retries are counted until `flush()`."""
        self._scope.cancel()

    def flush(self) -> None:
        """Log what has been counted, if anything, and start a quiet interval."""
        if not self._attempts or self._example is None:
            return
        now = trio.current_time()
        fields = {
            "sink": self.sink,
            "deliveries": self._deliveries,
            "attempts": self._attempts,
            "by_error": dict(self._kinds.most_common()),
            **self._example,
            "interval_s": round(now - self._since, 3),
        }
        log.warning("delivery will be retried", extra={"fields": fields})
        self.lines += 1
        self._deliveries = self._attempts = 0
        self._kinds = Counter()
        self._example = None
        self._quiet_until = now + self._interval
