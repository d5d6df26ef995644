"""The aggregator: a transform with `aggregate`, grouping its outputs into tumbling windows.

Delivery:
    Exactly once per window. Input events are validated, filtered and mapped as in any
    transform; each output joins its group's window in the transaction that moves the
    cursor (commit 1). A closed window's `reduce` result is stored as one event, with its
    deliveries, in the transaction that removes the window (commit 2). Both live in the
    store (`daemon.store.windows`), so a restart — even `kill -9` — loses nothing and emits
    nothing twice; a window closed but not yet emitted is emitted when the actor starts.

Time:
    Windows close by age on trio's clock (`trio.current_time()`), which is what tests drive
    with `MockClock`; a window's opening is also stored on the injected wall `clock` (`time.time`
    in the daemon; in tests one the `MockClock` moves too), so after a restart its remaining age
    is what is left of `max_age` since then.

Bad input:
    An event that breaks the schema or on which jq fails (map, filter, key) is dead-lettered as
    in `Transformer`; a window whose `reduce` fails is dead-lettered with its contents
    (`daemon.store.windows.commit_emitted`). A `reduce` that emits nothing drops the window (counted).

Backpressure:
    Reads at most `batch_size` events at a time and waits for each commit. Open windows cost
    one small record each in memory (their events are on disk).

Tracing:
    One `aggregator join` span per batch read (parent or links as in `Transformer`); none for a
    batch whose traces sampling left out, as in `Transformer`. The
    emitted event carries the stored trace context of the window's first event, so its
    deliveries join that event's trace.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import final

import trio
from opentelemetry import trace

from actors.transform.config import TransformConfig
from actors.transform.dead_letters import dead_lettered, error_text
from actors.transform.program import Failure, TransformProgram
from actors.transform.transformer import batch_trace
from daemon.store.api import Outbox
from daemon.store.outbox import StoredEvent, derived_id
from daemon.store.windows import (
    Emitted,
    Joined,
    Window,
    Windows,
)
from daemon.telemetry import otel as telemetry
from daemon.telemetry.masking import Masking
from daemon.telemetry.tap import Record, Taps

EMIT_CHUNK = 256
"""Most windows reduced and committed in one transaction."""


@final
class Aggregator:
    """Runs one aggregating transform; see the module docstring for its guarantees."""

    def __init__(
        self,
        name: str,
        config: TransformConfig,
        store: Outbox,
        *,
        sinks: list[str],
        transforms: list[str],
        batch_size: int = 1000,
        clock: Callable[[], float] = time.time,
        taps: Taps | None = None,
        redaction: Masking | None = None,
    ) -> None:
        assert config.aggregate is not None
        self._clock = clock
        self._taps = taps if taps is not None else Taps()
        self._redaction = redaction if redaction is not None else Masking()
        self.name = name
        self._inputs = list(config.inputs)
        self._store = store
        self._sinks = sinks
        self._wake = [*sinks, *transforms]
        self._batch_size = batch_size
        self._program = TransformProgram(config)
        self._windows = Windows(config.aggregate.max_events, config.aggregate.max_age)
        self._signal = store.signal(name)
        self.transformed = 0
        self.emitted = 0
        self.dropped = 0
        self.failed = 0

    def inherit(self, previous: Aggregator) -> None:
        """Take over the counters since start from the incarnation before this one (a restart
        builds a fresh aggregator; its windows and cursor are read back from the store)."""
        self.transformed, self.emitted = previous.transformed, previous.emitted
        self.dropped, self.failed = previous.dropped, previous.failed

    def __repr__(self) -> str:
        counts = (
            f"in: {self.transformed}, open windows: {len(self._windows.open)}, emitted: {self.emitted}, "
            f"dropped: {self.dropped}, dead: {self.failed}"
        )
        return f"<Aggregator {self.name} [{counts}]>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        store = self._store
        position = await store.cursor(self.name)
        stored = await store.stored_windows(self.name)
        self._windows.restore(stored, trio.current_time(), self._clock())
        task_status.started()
        while True:
            self._windows.expire(trio.current_time())
            closed = self._windows.take_closed()
            if closed:
                for start in range(0, len(closed), EMIT_CHUNK):  # bounded transactions and memory
                    await self._emit(closed[start : start + EMIT_CHUNK])
                continue
            events = await store.read_events(self._inputs, position, self._batch_size)
            if events:
                position = events[-1].seq
                tracer = telemetry.tracer()
                if tracer is None or not telemetry.any_sampled(event.trace for event in events):
                    position = await self._join(events, position)
                    continue
                parent, links = batch_trace(events)
                span = tracer.start_span(
                    "aggregator join", parent, attributes={"ferry.transform": self.name}, links=links
                )
                with trace.use_span(span, end_on_exit=True):
                    position = await self._join(events, position)
                continue
            deadline = self._windows.next_deadline()
            with trio.move_on_at(deadline if deadline is not None else trio.current_time() + 3600):
                await self._signal.wait()

    async def _join(self, events: list[StoredEvent], position: int) -> int:
        """Commit 1: place a batch's outputs in their windows, with its dead letters and the cursor;
        the cursor committed (short of `position` past `BATCH_OUTPUTS`, as in `Transformer`)."""
        name, windows = self.name, self._windows
        results = self._program.items([e.payload for e in events])
        if len(results) < len(events):
            events = events[: len(results)]
            position = events[-1].seq
        clock, wall = trio.current_time(), self._clock()
        joined: list[Joined] = []
        touched: dict[int, Window] = {}
        failures: list[tuple[StoredEvent, str]] = []
        for event, result in zip(events, results, strict=True):
            if isinstance(result, Failure):
                failures.append((event, error_text(event, result, self._redaction.redactor)))
                continue
            if not result:
                self.dropped += 1
            for nth, (payload, key) in enumerate(result):
                window, n = windows.join(key, clock, wall)
                touched[window.id] = window
                item_id = derived_id(event.id, name, nth)
                joined.append(Joined(window.id, n, item_id, payload, event.trace))
        await self._store.commit_joined(name, position, joined, list(touched.values()), failures)
        self.transformed += len(events)
        self.failed += len(failures)
        dead_lettered(name, [(event.id, error) for event, error in failures])
        return position

    async def _emit(self, closed: list[Window]) -> None:
        """Commit 2: reduce each closed window and store its event together with its removal."""
        name = self.name
        contents = await self._store.window_contents(name, [w.id for w in closed])
        emitted: list[Emitted] = []
        for window in closed:
            items = contents[window.id]
            if not items:  # nothing of it reached the store (cannot happen after commit 1; harmless)
                emitted.append(Emitted(window.id, "", None, None, ()))
                continue
            first_id, _, first_trace = items[0]
            result = self._program.reduce([payload for _, payload, _ in items])
            if isinstance(result, Failure):
                array = b"[" + b",".join(payload for _, payload, _ in items) + b"]"
                event = StoredEvent(0, first_id, name, array, first_trace)
                error = error_text(event, result, self._redaction.redactor)
                emitted.append(Emitted(window.id, first_id, None, first_trace, (), error, array))
            elif not result:
                emitted.append(Emitted(window.id, first_id, None, first_trace, ()))
            else:
                (payload, sinks) = result[0]
                targets = self._sinks if sinks is None else sinks
                emitted.append(Emitted(window.id, first_id, payload, first_trace, targets))
        stored = await self._store.commit_emitted(name, emitted, wake=self._wake)
        failed = sum(item.error is not None for item in emitted)
        self.emitted += stored
        self.failed += failed
        self.dropped += len(emitted) - stored - failed
        dead_lettered(name, [(item.id, item.error) for item in emitted if item.error is not None])
        if name in self._taps.taps:
            now = self._clock()
            for item in emitted:
                if item.payload is not None:
                    self._taps.publish(
                        name, Record("transform", item.id, item.payload, now, {"window": item.window})
                    )
