"""The transformer: one jq program applied to every event of its inputs.

Delivery:
    Exactly once per event. The transformer reads committed events after its
    cursor, and stores their outputs, their deliveries and its new cursor in
    one transaction. A crash before that commit re-runs the same events and
    derives the same output ids, so nothing is lost, doubled or re-keyed.

Bad input:
    An event that breaks the transform's `schema` (every violation listed) or on
    which jq fails dead-letters that event (stage = this transform, error = the
    violations or jq's message) and the rest of the batch goes on; the actor never
    stops for it. Events for which `filter` is false, or for which `map`
    emits nothing, are counted in `dropped`; outputs no route sends anywhere in
    `unrouted` (they are stored, for transforms reading this one, without deliveries).

Poison events (docs/reliability.md, "Poison events"):
    Anything else that raises on a batch — enrichment, jq, encoding an output, the commit —
    is bisected (`daemon.poison`): the event(s) that still raise alone are dead-lettered
    (`poison: … raised …`) and the rest of the batch commits. A crash or a killed process
    while working on an event is counted at the head of the stage (`daemon.store.quarantine`); after
    `[supervisor] quarantine_after` of them the event is dead-lettered as quarantined instead of
    being tried again. A store that is unavailable is waited out, never blamed on an event.

Retried dead letters:
    `ferry ctl dlq retry` makes this stage's dead letters pending again; the transformer runs
    their events through the transform again (they are looked for every `REVIVE_INTERVAL`
    seconds): the outputs commit and the row counts as delivered,
    or it dies again with the new reason and one more attempt.

Programs:
    `actors.transform.program.TransformProgram` (validation, jq, routes), shared with `ferry test`.

Enrichment:
    With an `Enricher` (`enrich`), each batch is first looked up and merged (see
    `actors.transform.enricher`); the batch commits once every lookup has an answer or has given up,
    and the events whose lookup failed are dead-lettered with the reason.

Tracing:
    One `transformer map` span per batch read. A batch of one event is a child of that
    event's stored trace context; a larger batch starts its own trace and links every
    event's context (one span per batch, not per event: the per-event cost stays one
    link). Outputs keep their parent's stored context, so their deliveries join the
    parent's trace.

Clock:
    Retried dead letters are looked for on trio's clock; what it stamps (tap records) reads the
    injected wall `clock` (`time.time` by default), so both run on a `MockClock` in tests.

Backpressure:
    Reads at most `batch_size` events at a time and waits for each commit
    before reading more; an idle transformer sleeps until the store signals a
    commit on one of its inputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, final

import trio
from opentelemetry import trace

from actors.transform.config import TransformConfig
from actors.transform.dead_letters import dead_lettered, error_text
from actors.transform.enricher import Enricher
from actors.transform.program import Failure, TransformProgram
from daemon import poison
from daemon.store.api import Outbox
from daemon.store.outbox import (
    Derived,
    StoredEvent,
    delivery_id,
    derived_id,
)
from daemon.store.quarantine import careful_until, quarantine_reason
from daemon.store.transform_retry import Revived
from daemon.telemetry import masking
from daemon.telemetry import otel as telemetry
from daemon.telemetry.tap import Record, Taps

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Link

log = logging.getLogger("ferry.transformer")

REVIVE_INTERVAL = 5.0
"""Seconds between looks for retried dead letters while events keep coming."""

Failed = tuple[StoredEvent, str, int]
"""An event dead-lettered by the transform: the event, the reason, the attempts it took."""


def batch_trace(events: list[StoredEvent]) -> tuple[Context | None, list[Link]]:
    """(parent, links) of a batch's span: the one event's context, or links to each event's."""
    if len(events) == 1:
        return telemetry.parent_context(events[0].trace), []
    links = [telemetry.link_to(event.trace) for event in events]
    return None, [link for link in links if link is not None]


@final
class Transformer:
    """Applies one transform's jq program; see the module docstring for its guarantees."""

    def __init__(
        self,
        name: str,
        config: TransformConfig,
        store: Outbox,
        *,
        sinks: list[str],
        transforms: list[str],
        batch_size: int = 1000,
        enricher: Enricher | None = None,
        quarantine_after: int = 3,
        clock: Callable[[], float] = time.time,
        taps: Taps | None = None,
        redaction: masking.Masking | None = None,
    ) -> None:
        self.name = name
        self._clock = clock
        self._taps = taps if taps is not None else Taps()
        self._redaction = redaction if redaction is not None else masking.Masking()
        self._quarantine_after = quarantine_after
        self._enricher = enricher
        self._inputs = list(config.inputs)
        self._store = store
        self._sinks = sinks
        self._wake = [*sinks, *transforms]
        self._batch_size = batch_size
        self._program = TransformProgram(config)
        self._signal = store.signal(name)
        self.transformed = 0
        self.dropped = 0
        self.unrouted = 0
        self.failed = 0
        self.poisoned = 0
        self._proven = False

    def inherit(self, previous: Transformer) -> None:
        """Take over the counters since start from the incarnation before this one (a restart
        builds a fresh transformer: program, enricher and its cache; its cursor is in the store)."""
        self.transformed, self.dropped, self.unrouted = (
            previous.transformed,
            previous.dropped,
            previous.unrouted,
        )
        self.failed, self.poisoned = previous.failed, previous.poisoned

    def __repr__(self) -> str:
        counts = f"in: {self.transformed}, dropped: {self.dropped}, dead: {self.failed}"
        if self.unrouted:
            counts += f", unrouted: {self.unrouted}"
        return f"<Transformer {self.name} [{counts}]>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        finally:
            if self._enricher is not None:
                await self._enricher.aclose()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        store = self._store
        position = await store.cursor(self.name)
        careful = careful_until(await store.read_head(self.name), position)
        self._proven = False  # a batch of this incarnation has committed (see `_map`)
        task_status.started()
        marked = False  # this incarnation has recorded its head (daemon.store.quarantine)
        revive_at = 0.0
        while True:
            if trio.current_time() >= revive_at:
                revive_at = trio.current_time() + REVIVE_INTERVAL
                if await self._revive():
                    continue
            limit = 1 if position < careful else self._batch_size
            events = await store.read_events(self._inputs, position, limit)
            if not events:
                with trio.move_on_at(revive_at):
                    await self._signal.wait()
                continue
            if not marked or position < careful:
                marked = True
                head = await store.attempt_head(self.name, events[0].seq, events[-1].seq)
                if head.attempts > self._quarantine_after:
                    await self._quarantine(events[0], head.attempts - 1)
                    position = events[0].seq
                    continue
                if head.attempts > 1:  # the last incarnation did not get past it: one at a time
                    careful = max(careful, head.until)
                    events = events[:1]
            position = events[-1].seq
            tracer = telemetry.tracer()
            if tracer is None or not telemetry.any_sampled(event.trace for event in events):
                await self._map(events)
                continue
            parent, links = batch_trace(events)
            span = tracer.start_span(
                "transformer map", parent, attributes={"ferry.transform": self.name}, links=links
            )
            with trace.use_span(span, end_on_exit=True):
                await self._map(events)

    async def _map(self, events: list[StoredEvent]) -> None:
        """Transform one batch and commit it; bisect it when that raises (`daemon.poison`).

        An event that raises alone is dead-lettered only once a batch of this incarnation has
        committed; until then the error is raised, as a bug or a broken environment is (the actor
        restarts; after `quarantine_after` restarts at the same head, the head is quarantined)."""

        async def run(part: Sequence[StoredEvent]) -> None:
            rest = list(part)
            while rest:  # a part whose outputs pass BATCH_OUTPUTS commits a prefix at a time
                committed = await self._map_batch(rest, rest[-1].seq)
                rest = [event for event in rest if event.seq > committed]

        async def dead(event: StoredEvent, exc: Exception) -> None:
            if not self._proven:  # nothing has worked yet: blame the code, not the data
                raise exc
            await self._dead([(event, poison.reason(f"transform {self.name}", exc), 1)], event.seq)

        self.poisoned += await poison.bisect(events, run, dead)

    async def _quarantine(self, event: StoredEvent, attempts: int) -> None:
        """Dead-letter the event at the head after `attempts` crashes on it (`daemon.store.quarantine`)."""
        reason = quarantine_reason(f"transform {self.name}", attempts)
        log.error(
            "event quarantined",
            extra={"fields": {"transform": self.name, "event_id": event.id, "attempts": attempts}},
        )
        self.poisoned += 1
        await self._dead([(event, reason, attempts)], event.seq)

    async def _dead(self, failures: list[Failed], position: int) -> None:
        """Commit dead letters alone, with the cursor moved to `position`."""
        await self._store.commit_transform(self.name, position, [], failures, self._sinks, wake=self._wake)
        self.failed += len(failures)
        dead_lettered(self.name, [(event.id, error) for event, error, _ in failures])

    async def _map_batch(self, events: list[StoredEvent], position: int) -> int:
        """Transform one batch and commit its outputs, deliveries, dead letters and cursor; the
        cursor committed. That is `position` (the batch's last seq) unless the batch's outputs
        passed `actors.transform.program.BATCH_OUTPUTS`: then only the events up to there are committed
        (bounded memory whatever one event fans out to), and the caller goes on after them.

        All or nothing: the counters move only once the commit has returned.
        """
        failures: list[Failed] = []
        if self._enricher is not None:
            events, looked_up = await self._enricher.enrich(events)
            failures = [
                (event, error_text(event, Failure(why), self._redaction.redactor), attempts)
                for event, why, attempts in looked_up
            ]
        outputs, failed, dropped, unrouted, done = self._transform(events)
        if done < len(events):
            position = events[done - 1].seq
            events = events[:done]
            failures = [failure for failure in failures if failure[0].seq <= position]
        failures.extend(failed)
        await self._store.commit_transform(
            self.name, position, outputs, failures, self._sinks, wake=self._wake
        )
        self._proven = True
        self.transformed += len(events)
        self.failed += len(failures)
        self.dropped += dropped
        self.unrouted += unrouted
        dead_lettered(self.name, [(event.id, error) for event, error, _ in failures])
        if self.name in self._taps.taps:
            self._tap(outputs, failures)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                {"ferry.events": len(events), "ferry.outputs": len(outputs), "ferry.failed": len(failures)}
            )
        return position

    async def _revive(self) -> bool:
        """Run retried dead letters (`dlq retry`) through the transform again; whether any were."""
        rows = await self._store.revived(self.name, self._batch_size)
        for row in rows:
            await self._revive_one(row)
        return bool(rows)

    async def _revive_one(self, row: Revived) -> None:
        error: str | None = None
        outputs: list[Derived] = []
        try:
            events = [row.event]
            if self._enricher is not None:
                events, looked_up = await self._enricher.enrich(events)
                if looked_up:
                    error = error_text(row.event, Failure(looked_up[0][1]), self._redaction.redactor)
            if error is None:
                outputs, failed, _, _, _ = self._transform(events)
                if failed:
                    error = failed[0][1]
        except Exception as exc:
            if not poison.isolable(exc):
                raise
            error = poison.reason(f"transform {self.name}", exc)
        try:
            await self._store.commit_revived(self.name, row, outputs, error, self._sinks, wake=self._wake)
        except Exception as exc:
            if not poison.isolable(exc) or error is not None:
                raise
            error = poison.reason(f"transform {self.name} (commit)", exc)
            await self._store.commit_revived(self.name, row, [], error, self._sinks, wake=self._wake)
        if error is not None:
            self.failed += 1
            dead_lettered(self.name, [(row.event.id, error)])

    def _tap(self, outputs: list[Derived], failures: list[Failed]) -> None:
        """Hand committed outputs (and jq's dead letters) to the taps on this transform."""
        name, now = self.name, self._clock()
        for parent, nth, payload, _ in outputs:
            event_id = derived_id(parent.id, name, nth)
            self._taps.publish(name, Record("transform", event_id, payload, now, {"parent": parent.id}))
        for event, error, _ in failures:
            extra = {"parent": event.id, "outcome": "dead", "error": error}
            self._taps.publish(
                name, Record("transform", delivery_id(event.id, name), event.payload, now, extra)
            )

    def _transform(self, events: list[StoredEvent]) -> tuple[list[Derived], list[Failed], int, int, int]:
        """(outputs, dead letters, events that gave no output, outputs no route sends anywhere, how
        many of `events` they cover: a prefix, past `BATCH_OUTPUTS`)."""
        failures: list[Failed] = []
        outputs: list[Derived] = []
        dropped = unrouted = 0
        results = self._program.map([e.payload for e in events])
        for event, result in zip(events[: len(results)], results, strict=True):
            if isinstance(result, Failure):
                failures.append((event, error_text(event, result, self._redaction.redactor), 1))
                continue
            if not result:
                dropped += 1
            for nth, (payload, sinks) in enumerate(result):
                if sinks is not None and not sinks:
                    unrouted += 1
                outputs.append(Derived(event, nth, payload, sinks))
        return outputs, failures, dropped, unrouted, len(results)
