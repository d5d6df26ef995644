"""Coalesces concurrent webhook requests into one store write per commit cycle.

Delivery:
    A caller returns only after the commit that holds its event (or, for a
    repeated idempotency key, the lookup that found the original), so the
    listener's 202 always follows durability. A failed commit raises
    `StoreUnavailable` to every caller in that write; none was acknowledged.

Why:
    Each request as its own store request costs a Python round of
    `INSERT`s on the writer thread per event; one `executemany` per batch costs
    a fraction of that, and the writer's group commit still merges these
    batches with the other stages' writes.

Reload:
    `rewire(sinks, consumers)` swaps both maps at once (no await between), so each
    request sees the old wiring or the new one, never a mix. A request already queued
    keeps the sinks it was queued with; a wake-up for a consumer that no longer exists
    is dropped (its rows are in the store either way).

Backpressure:
    At most `FLUSHERS` writes are in the store at once; requests arriving
    meanwhile wait in `pending`, which holds at most one request per open
    connection (the listener's `max_connections`). `waiting` counts every
    request not yet answered; the listener sheds new requests (503) while it
    is at `[listener] max_pending`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import final

import trio
from opentelemetry import trace
from opentelemetry.trace import Span, StatusCode

from daemon.errors import StoreUnavailable
from daemon.store.api import Outbox
from daemon.store.outbox import Incoming
from daemon.telemetry import otel as telemetry
from daemon.telemetry.tap import Record, Taps

FLUSHERS = 2


class _Waiter:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: tuple[str, bool] = ("", False)
        self.error: BaseException | None = None


@final
class IngestBatcher:
    """The webhook listener's `Ingest`: `await batcher(source, body, key, traceparent)`."""

    def __init__(
        self,
        store: Outbox,
        *,
        sinks: Mapping[str, Sequence[str]],
        consumers: Mapping[str, Sequence[str]],
        dedup_window: float,
        taps: Taps | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._clock = clock
        self._sinks = sinks
        self._consumers = consumers
        self._dedup_window = dedup_window
        self._taps = taps if taps is not None else Taps()
        self._pending: list[tuple[Incoming, _Waiter]] = []
        self._wakeup = trio.Event()
        self.writes = 0
        self.events = 0
        """Events stored since start: not duplicates, not requests the store refused."""
        self.waiting = 0
        """Requests waiting for their commit now."""

    def rewire(self, *, sinks: Mapping[str, Sequence[str]], consumers: Mapping[str, Sequence[str]]) -> None:
        """Route new events by these maps from now on (a reload); see "Reload" above."""
        self._sinks, self._consumers = sinks, consumers

    def __repr__(self) -> str:
        return (
            f"<IngestBatcher [pending: {len(self._pending)}, writes: {self.writes}, events: {self.events}]>"
        )

    async def __call__(
        self,
        source: str,
        body: bytes,
        dedup_key: str | None,
        traceparent: str | None,
        replay: tuple[str, float] | None = None,
        *,
        parent: Span | None = None,
    ) -> tuple[str, bool]:
        """Store one event; with tracing, inside a `store commit` span, child of `parent` (the
        caller's span, whose context `traceparent` is; without it, `traceparent` is parsed).

        `replay` (key, until): see `outbox.insert_events`; a replay answers `("", True)`.
        """
        tracer = telemetry.tracer()
        if tracer is None or not telemetry.sampled(traceparent):
            return await self._commit(source, body, dedup_key, traceparent, replay)
        context = (
            trace.set_span_in_context(parent) if parent is not None else telemetry.parent_context(traceparent)
        )
        span = tracer.start_span("store commit", context, attributes={"ferry.source": source})
        try:
            event_id, duplicate = await self._commit(source, body, dedup_key, traceparent, replay)
            span.set_attribute("ferry.event_id", event_id)
            span.set_attribute("ferry.duplicate", duplicate)
        except BaseException as exc:
            span.set_status(StatusCode.ERROR, type(exc).__name__)
            raise
        finally:
            span.end()
        return event_id, duplicate

    async def _commit(
        self,
        source: str,
        body: bytes,
        dedup_key: str | None,
        traceparent: str | None,
        replay: tuple[str, float] | None,
    ) -> tuple[str, bool]:
        waiter = _Waiter()
        incoming = Incoming(source, body, traceparent, self._sinks[source], dedup_key, replay)
        self._pending.append((incoming, waiter))
        self._wakeup.set()
        self.waiting += 1
        try:
            await waiter.done.wait()
        finally:
            self.waiting -= 1
        if waiter.error is not None:
            raise waiter.error
        return waiter.result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(FLUSHERS):
                nursery.start_soon(self._flush_forever)
            task_status.started()

    async def _flush_forever(self) -> None:
        while True:
            if not self._pending:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            batch, self._pending = self._pending, []
            await self._flush(batch)

    async def _flush(self, batch: list[tuple[Incoming, _Waiter]]) -> None:
        incoming = [item for item, _ in batch]
        consumers = self._consumers
        wake = {consumer for item in incoming for consumer in consumers.get(item.stream, ())}
        try:
            results = await self._store.insert_events(incoming, dedup_window=self._dedup_window, wake=wake)
            for (_, waiter), result in zip(batch, results, strict=True):
                waiter.result = result
            self.events += sum(1 for _, duplicate in results if not duplicate)
            if self._taps.taps:
                _tap(self._taps, incoming, results, self._clock())
        except StoreUnavailable as exc:
            for _, waiter in batch:
                waiter.error = exc
        except BaseException:
            for _, waiter in batch:
                waiter.error = StoreUnavailable("ingest stopped before the commit was confirmed")
            raise
        finally:
            for _, waiter in batch:
                waiter.done.set()
        self.writes += 1


def _tap(taps: Taps, incoming: list[Incoming], results: list[tuple[str, bool]], now: float) -> None:
    """Hand committed events (not duplicates) to the taps on their source, stamped `now`."""
    for item, (event_id, duplicate) in zip(incoming, results, strict=True):
        if not duplicate and item.stream in taps.taps:
            taps.publish(item.stream, Record("source", event_id, item.payload, now))
