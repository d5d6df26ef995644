"""The sink: delivers one stage's pending deliveries with retries and a dead-letter queue.

Delivery:
    At least once. A delivery leaves the store's pending set only when its
    outcome has committed: `delivered` (2xx), `dead` (a permanent error, or out
    of attempts or age) or a retry scheduled at `next_attempt_at`. A crash at
    any point leaves the delivery pending, to be sent again with the same id
    (its idempotency key), so a receiver can drop the duplicate. Attempts that finish while
    the previous outcomes are being committed share one store request (`actors.sink.commit`);
    each worker still waits for its own outcomes' commit before taking the next row.

Retries:
    Retryable failures (408, 425, 429, 5xx, timeouts, transport errors) are
    rows with a new `next_attempt_at` — exponential backoff with full jitter,
    never earlier than the server's `Retry-After` (up to an hour) nor later than
    the delivery's `max_age` (`daemon.limits.backoff`) — not sleeping tasks. Other
    4xx, redirects and bad payloads are dead-lettered at once.

Backpressure and memory:
    One fetcher (`actors.sink.fetcher`) reads due rows (at most `concurrency` x batch
    size ahead) into a bounded channel; `concurrency` workers send them. Rows beyond
    that stay on disk, so a backlog of millions costs no memory.

Tracing and metrics:
    Each attempt is a CLIENT span `sink deliver`, child of the event's stored trace
    context (a batch of many: its own trace, linking every event's context), current
    while the sender runs so that it can inject `traceparent` into the request. An attempt
    of a trace that sampling left out has no span, yet its request carries the stored
    `traceparent` (sampled flag 00), as W3C trace context asks. Attempts,
    outcomes, attempt durations, delivery latency and dead letters are counted on
    `daemon.telemetry.metrics`.

Shutdown:
    `stop()` ends fetching; workers finish what they hold and return. A
    worker cancelled mid-request leaves its delivery pending.

Ordering:
    With an `Ordering` (`[sinks.NAME] ordering`), fetches return only each record key's next
    delivery and outcomes raise the key's delivered version (see `daemon.store.ordering`); rows
    found stale or unkeyable on the way are counted (`stale`, `dead`) and logged.

Admission (actors/sink/guard.py):
    With a guard, each attempt first waits for `guard.admit()` — an adaptive concurrency
    slot, a URL whose circuit breaker lets it through, a rate-limit permit — and reports its
    result to it. While it waits nothing is sent and no attempt is counted; a failed breaker
    probe is rescheduled whatever the attempt and age limits. `stop()` and `pause()` release
    the workers waiting there (their rows stay pending), so neither waits for a cool-down.

Poison (docs/reliability.md, "Poison events"):
    A send that raises anything but a `DeliveryError` (a payload the sender or the masking
    cannot handle) dead-letters that delivery with the reason; a batch is bisected, each half
    sent again, down to the deliveries that fail alone. Text that cannot be masked is hidden.
    A delivery at the head of the stage across repeated crashes is quarantined
    (`actors.sink.quarantine`).

Clock:
    Due times, backoff and delivery latency are wall-clock seconds from the injected `clock`
    (`time.time` by default); a test hands it `trio.current_time` plus an offset, so retries come
    due when a `MockClock` jumps. Request durations are measured with `time.monotonic` (real I/O).

Pausing:
    `pause()` stops the fetcher and makes workers hand back (unsent) the rows they
    have not started sending; requests already on the wire finish. Deliveries stay
    pending in the store; `resume()` fetches them again. The pause outlives a restart
    of the actor (the supervisor reuses this object), not of the daemon.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, final

import trio
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode

from actors.sink.bookkeeping import (
    batch_trace,
    count,
    guarded_error,
    guarded_text,
    outcome_of,
    settled_in_fetch,
    span_attributes,
    tap,
)
from actors.sink.commit import Finished, OutcomeCommitter, recorder
from actors.sink.config import BatchConfig, RetryConfig
from actors.sink.fetcher import Fetcher, top_up
from actors.sink.guard import Admission, SinkGuard
from actors.sink.items import scrubbed_items
from actors.sink.judge import Answer, judge
from actors.sink.outcomes import log_committed
from actors.sink.retry_log import RetryLog
from daemon import poison
from daemon.errors import DeliveryError, PermanentDelivery
from daemon.limits.backoff import MAX_WAIT
from daemon.store.api import Outbox
from daemon.store.ordering import Fetched, Ordering
from daemon.store.outbox import Due, Outcomes
from daemon.telemetry import masking, metrics
from daemon.telemetry import otel as telemetry
from daemon.telemetry.tap import Taps


class Sender(Protocol):
    """Sends a batch of deliveries (one, unless batching) in one attempt.

    Returns the HTTP status (or None, or an `Answer` with an excerpt of the body) on success;
    raises `RetryableDelivery` or `PermanentDelivery` on failure. Must bound every call with a timeout.
    """

    async def send(self, batch: Sequence[Due]) -> int | Answer | None: ...

    async def aclose(self) -> None: ...


@final
class Sink:
    """Delivers the deliveries of stage `name` through a `Sender`; see the module docstring."""

    def __init__(
        self,
        name: str,
        store: Outbox,
        sender_factory: Callable[[], Sender],
        *,
        retry: RetryConfig,
        concurrency: int = 1,
        batch: BatchConfig | None = None,
        ordering: Ordering | None = None,
        guard: SinkGuard | None = None,
        quarantine_after: int = 3,
        clock: Callable[[], float] = time.time,
        taps: Taps | None = None,
        redaction: masking.Masking | None = None,
        send_timeout: float = 0.0,
    ) -> None:
        self.name = name
        self._send_timeout = send_timeout  # the longest one request takes (claims must outlast it)
        self._clock = clock
        self._taps = taps if taps is not None else Taps()
        self._redaction = redaction if redaction is not None else masking.Masking()
        self._proven = False
        self.guard = guard
        self._admitting: set[trio.CancelScope] = set()  # workers waiting for the guard
        self._store = store
        self._sender_factory = sender_factory
        self._retry = retry
        self._concurrency = concurrency
        self._batch = batch
        self._batch_items = batch.max_items if batch else 1
        self._ordering = ordering
        self._signal = store.signal(name)
        self._stopping = trio.Event()
        self._resumed = trio.Event()
        self._resumed.set()
        self._fetcher = Fetcher(
            name,
            store,
            self._signal,
            ordering=ordering,
            quarantine_after=quarantine_after,
            clock=clock,
            running=lambda: not self._stopping.is_set(),
            paused=lambda: not self._resumed.is_set(),
            wait_resumed=self._wait_resumed,
            dropped=self._settled_in_fetch,
        )
        self.delivered = 0
        self.retried = 0
        self.dead = 0
        self.stale = 0
        self._retries = RetryLog(name)  # one warning per interval (actors/sink/retry_log.py)

    def __repr__(self) -> str:
        in_flight = self._fetcher.in_flight
        counts = f"delivered: {self.delivered}, retried: {self.retried}, dead: {self.dead}"
        return f"<Sink {self.name} [in flight: {in_flight}, {counts}]>"

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    def pause(self) -> None:
        """Stop fetching and sending until `resume()`; see "Pausing" in the module docstring."""
        if self._resumed.is_set():
            self._resumed = trio.Event()
            self._signal.fire()
            self._release_admitting()

    def resume(self) -> None:
        self._resumed.set()

    def stop(self) -> None:
        """Stop fetching; `run` returns once the workers have finished what they hold."""
        self._stopping.set()
        self._signal.fire()
        self._release_admitting()

    def _release_admitting(self) -> None:
        """Workers waiting for admission (an open breaker, the rate limit) give up and hand back
        their rows, unsent: stopping or pausing never waits for a breaker's cool-down."""
        for scope in self._admitting:
            scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sender = self._sender_factory()
        self._retries = retries = RetryLog(self.name)
        self._proven = False  # no send of this incarnation has worked yet (see `_isolate`)
        self._fetcher.reset()
        send_channel, receive_channel = trio.open_memory_channel[list[Due]](self._concurrency)
        committer = OutcomeCommitter(
            recorder(self._store, self._ordering),
            wake=self._wake_on_commit,
            settle=self._settle,
            committed=self._committed,
        )
        await self._store.unpark(self.name, self._clock(), MAX_WAIT)
        if self.guard is not None:
            self.guard.publish()
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(committer.run)
                outer.start_soon(retries.run)
                try:
                    async with trio.open_nursery() as nursery:
                        async with receive_channel:
                            for _ in range(self._concurrency):
                                nursery.start_soon(self._worker, sender, committer, receive_channel.clone())
                        task_status.started()
                        async with send_channel:
                            chunk = self._batch_items
                            await self._fetcher.run(send_channel, chunk, self._concurrency * chunk)
                finally:
                    committer.close()
                    retries.close()
        finally:
            retries.flush()
            if self.guard is not None:
                self.guard.forget()  # a sink removed by a reload stops being reported
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await sender.aclose()

    def _settled_in_fetch(self, fetched: Fetched) -> None:
        """Count and log what an ordered fetch dropped as stale or dead-lettered as unkeyable.

        Final outcomes, so they go to `ferry.sink.outcome` like the others: every id in a line.
        """
        self.stale += fetched.stale
        self.dead += fetched.dead
        settled_in_fetch(self.name, fetched)

    async def _wait_resumed(self) -> None:
        async with trio.open_nursery() as nursery:

            async def until(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(until, self._resumed)
            nursery.start_soon(until, self._stopping)

    async def _worker(
        self, sender: Sender, committer: OutcomeCommitter, channel: trio.MemoryReceiveChannel[list[Due]]
    ) -> None:
        leftover: list[Due] = []
        async with channel:
            while True:
                if leftover:
                    rows, leftover = leftover, []
                else:
                    try:
                        try:  # rows waiting: no trip through the scheduler (the attempt's commit waits)
                            rows = channel.receive_nowait()
                        except trio.WouldBlock:
                            rows = await channel.receive()
                    except trio.EndOfChannel:
                        return
                batch, leftover = await self._fill(rows, channel)
                admission = await self._admit() if self.guard is not None else None
                released = self.guard is not None and admission is None
                if released or not self._resumed.is_set():  # stopping or paused: hand back unsent
                    if admission is not None:
                        admission.cancel()
                    self._fetcher.settle([due.rowid for due in (*batch, *leftover)])
                    leftover = []
                    continue
                if self._fetcher.claims_lapse:  # a store shared with other nodes
                    batch = await self._fetcher.reclaim(batch, self._send_timeout)
                if not self._fetcher.head_checked:
                    await self._fetcher.check_head()
                if self._fetcher.quarantined:
                    batch = [due for due in batch if due.rowid not in self._fetcher.quarantined]
                if not batch:  # claimed by another node while it waited, or quarantined
                    if admission is not None:
                        admission.cancel()
                    continue
                tracer = telemetry.tracer()
                if tracer is None or not telemetry.any_sampled(due.trace for due in batch):
                    # Left out by sampling: no span, but the request still carries the stored
                    # context (flag 00) so that the receiver's trace decision follows ours.
                    unrecorded = (
                        telemetry.unrecorded_span(batch[0].trace) if tracer and len(batch) == 1 else None
                    )
                    if unrecorded is None:
                        await self._attempt(sender, committer, batch, None, admission)
                    else:
                        with trace.use_span(unrecorded):
                            await self._attempt(sender, committer, batch, None, admission)
                    continue
                parent, links = batch_trace(batch)
                span = tracer.start_span(
                    "sink deliver", parent, SpanKind.CLIENT, span_attributes(self.name, batch), links
                )
                try:
                    with trace.use_span(span):
                        await self._attempt(sender, committer, batch, span, admission)
                finally:
                    if span.is_recording():  # cut short before `_attempt` ended it
                        span.end()

    async def _admit(self) -> Admission | None:
        """The guard's admission; None when `stop()` or `pause()` released the wait."""
        assert self.guard is not None
        if self._stopping.is_set() or not self._resumed.is_set():
            return None
        admission = self.guard.admit_now()  # no wait, no checkpoint: the common case
        if admission is not None:
            return admission
        with trio.CancelScope() as scope:
            self._admitting.add(scope)
            try:
                return await self.guard.admit()
            finally:
                self._admitting.discard(scope)
        return None

    async def _attempt(
        self,
        sender: Sender,
        committer: OutcomeCommitter,
        batch: list[Due],
        span: Span | None,
        admission: Admission | None = None,
        suspects: list[tuple[Due, BaseException]] | None = None,
    ) -> None:
        """Send one batch, judge the result, end the attempt's span, record the outcomes.

        `suspects`: within `_isolate`, where the deliveries that raise alone are gathered."""
        error: DeliveryError | None = None
        status: int | None = None
        response: str | None = None
        items: Mapping[int, DeliveryError] | None = None
        redactor = self._redaction.redactor  # read per attempt: a reload swaps it
        began = time.monotonic()
        try:
            answer = await sender.send(batch)
            status, response = (
                (answer.status, answer.excerpt) if isinstance(answer, Answer) else (answer, None)
            )
            if isinstance(answer, Answer) and answer.items:
                items = scrubbed_items(answer.items, [due.payload for due in batch], redactor)
        except DeliveryError as exc:
            error = guarded_error(exc, batch, redactor)
        except BaseException as exc:
            if admission is not None:
                admission.cancel()  # cut short (cancelled, crashed): no result to learn from
            if not poison.isolable(exc):
                raise
            await self._isolate(sender, committer, batch, exc, span, suspects)
            return
        self._proven = True
        elapsed = time.monotonic() - began
        if response is not None:
            response = guarded_text(response, batch, redactor)
        hold = admission.done(error, elapsed) if admission is not None else False
        outcomes = judge(batch, error, status, self._retry, self._clock(), hold=hold, items=items)
        outcome = outcome_of(outcomes)
        if span is not None:
            span.set_attribute("ferry.outcome", outcome)
            if items:
                span.set_attribute("ferry.batch.refused", len(items))
            if error is not None:
                span.set_attribute("error.type", str(error.status) if error.status else type(error).__name__)
                span.set_status(StatusCode.ERROR, str(error)[:200])
            span.end()
        metrics.current().delivery_duration.record(elapsed, {"sink": self.name, "outcome": outcome})
        # A refused item stands for the attempt's error in the retry warning.
        logged = error if error is not None or not items else next(iter(items.values()))
        await committer.commit(Finished(batch, outcomes, logged, elapsed, response))

    async def _isolate(
        self,
        sender: Sender,
        committer: OutcomeCommitter,
        batch: list[Due],
        exc: BaseException,
        span: Span | None,
        suspects: list[tuple[Due, BaseException]] | None,
    ) -> None:
        """Sending `batch` raised something that is no delivery error (a payload the sender or the
        masking cannot handle): bisect it, each half sent again, down to the deliveries that fail
        alone, and dead-letter those with the reason (docs/reliability.md, "Poison events").

        Blame falls on the data only once a send of this incarnation has worked (here or in
        another worker): until then the error is raised, as a bug or a broken environment is
        (the actor restarts; `TooManyRestarts`; a delivery at the head across the crashes is
        quarantined by `actors.sink.quarantine`)."""
        if span is not None:
            span.set_status(StatusCode.ERROR, type(exc).__name__)
            span.end()
        found: list[tuple[Due, BaseException]] = [] if suspects is None else suspects
        if len(batch) > 1:
            middle = len(batch) // 2
            await self._attempt(sender, committer, batch[:middle], None, suspects=found)
            await self._attempt(sender, committer, batch[middle:], None, suspects=found)
        else:
            found.append((batch[0], exc))
        if suspects is not None:
            return
        if not self._proven:
            raise found[0][1]
        for due, error in found:
            reason = poison.reason(f"sink {self.name}", error)
            outcomes = Outcomes([], [], [(due.rowid, None, reason)])
            await committer.commit(Finished([due], outcomes, PermanentDelivery(reason), 0.0, None))

    async def _fill(
        self, rows: list[Due], channel: trio.MemoryReceiveChannel[list[Due]]
    ) -> tuple[list[Due], list[Due]]:
        """Top `rows` up to a full batch within `max_wait`; return (batch to send now, rows left over)."""
        config = self._batch
        if config is None:
            return rows[:1], rows[1:]
        rows = await top_up(rows, channel, config.max_items, config.max_wait)
        size, cut = 0, 0
        for row in rows[: config.max_items]:
            size += len(row.payload) + 1
            if cut and size > config.max_bytes:
                break
            cut += 1
        return rows[:cut], rows[cut:]

    def _wake_on_commit(self, entries: Sequence[Finished]) -> Sequence[str]:
        return [self.name] if self._ordering or any(entry.outcomes.retry for entry in entries) else ()

    def _settle(self, entries: Sequence[Finished]) -> None:
        """After a commit (or a failed one): the rows leave the in-flight set at the next fetch.

        The attempts are counted here, committed or not: their requests were sent.
        """
        metrics.current().attempts.add(len(entries), {"sink": self.name})
        fetcher = self._fetcher
        for entry in entries:
            fetcher.settle([due.rowid for due in entry.batch])
            for _, at, _, _ in entry.outcomes.retry:
                fetcher.retry_at(at)
        if any(entry.outcomes.retry for entry in entries):
            # The commit's wake-up can reach the fetcher before these rows are settled; it
            # then skips them as in flight and, none being due later, sleeps for an hour.
            self._signal.fire()

    def _committed(self, entries: Sequence[Finished]) -> None:
        """Count, tap and log attempts whose outcomes committed together."""
        delivered = retried = dead = 0
        for entry in entries:
            delivered += len(entry.outcomes.delivered)
            retried += len(entry.outcomes.retry)
            dead += len(entry.outcomes.dead)
        self.delivered += delivered
        self.retried += retried
        self.dead += dead
        now = self._clock()
        count(self.name, entries, delivered, retried, dead, now)
        if self.name in self._taps.taps:
            for entry in entries:
                tap(self._taps, self.name, entry.batch, entry.outcomes, now)
        log_committed(
            self.name, [(entry.batch, entry.outcomes, entry.latency, entry.response) for entry in entries]
        )
        self._retries.note(entries)
