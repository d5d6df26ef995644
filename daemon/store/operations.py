"""The domain operations of `daemon.store.api.Outbox`, declared once for every backend.

`Operations` is the group-commit engine (`daemon.store.engine.GroupCommit`) with the interface on
top: each method is one `partial` of the backend's store function (`daemon.store.functions`) and
one call into `call` (fail fast) or `call_until_committed` (wait it out), as `daemon.store.api`
decides per operation — no other cost on the pipeline's paths. A singleton's commits (a
transform's cursor, a window, a poll page, the alert states) go through the backend's `guarded`
(PostgreSQL: the lease's fencing check; SQLite: nothing).

A backend is `Operations` with its connection type, its store functions and its `Transactions`
(set before `run`): SQLite's `daemon.store.sqlite.Store`, PostgreSQL's
`daemon.store.postgres.store.PostgresStore`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from functools import partial
from typing import TypeVar

from daemon.store.api import Attempt, Failed, Failure
from daemon.store.engine import GroupCommit
from daemon.store.functions import Contents, Functions, Pages
from daemon.store.keying import Fetched, Ordering
from daemon.store.types import (
    AlertState,
    AuditRow,
    Committed,
    DeadFilter,
    DeadLetter,
    Derived,
    Due,
    EventReport,
    Head,
    Incoming,
    PageCheck,
    PollState,
    Revived,
    StoredEvent,
)
from daemon.store.windowing import Emitted, Joined, Window

C = TypeVar("C")


def _prune(
    conn: C,
    functions: Functions[C],
    retention: float,
    archive: float,
    dedup_window: float,
    readers: Mapping[str, Sequence[str]],
    audit_retention: float,
) -> int:
    removed = functions.prune(
        conn,
        retention=retention,
        dedup_window=dedup_window,
        readers={stream: list(names) for stream, names in readers.items()},
        archive=archive,
    )
    return removed + functions.prune_audit(conn, retention=audit_retention)


class Operations(GroupCommit[C]):
    """`Outbox` on the engine, over a backend's store `functions` (see the module docstring)."""

    def __init__(
        self, functions: Functions[C], *, max_batch: int = 4096, thread_name: str = "ferry-store-writer"
    ) -> None:
        super().__init__(max_batch=max_batch, thread_name=thread_name)
        self._functions = functions

    # -- ingest (fail fast) --------------------------------------------------------------------

    async def insert_events(
        self, incoming: Sequence[Incoming], *, dedup_window: float, wake: Collection[str] = ()
    ) -> list[tuple[str, bool]]:
        fn = partial(self._functions.insert_events, incoming=incoming, dedup_window=dedup_window)
        return await self.call(fn, wake=wake)

    # -- transforms (wait) ---------------------------------------------------------------------

    async def cursor(self, name: str) -> int:
        return await self.call_until_committed(partial(self._functions.cursor, name=name))

    async def read_events(self, streams: Sequence[str], after: int, limit: int) -> list[StoredEvent]:
        fn = partial(self._functions.read_events, streams=streams, after=after, limit=limit)
        return await self.call_until_committed(fn)

    async def commit_transform(
        self,
        name: str,
        position: int,
        outputs: Sequence[Derived],
        failures: Sequence[Failed],
        sinks: Sequence[str],
        *,
        wake: Collection[str] = (),
    ) -> int:
        functions = self._functions
        fn = partial(
            functions.commit_transform,
            name=name,
            position=position,
            outputs=outputs,
            failures=failures,
            sinks=sinks,
        )
        return await self.call_until_committed(functions.guarded(fn), wake=wake)

    async def revived(self, stage: str, limit: int) -> list[Revived]:
        return await self.call_until_committed(partial(self._functions.revived, stage=stage, limit=limit))

    async def commit_revived(
        self,
        name: str,
        row: Revived,
        outputs: Sequence[Derived],
        error: str | None,
        sinks: Sequence[str],
        *,
        wake: Collection[str] = (),
    ) -> None:
        functions = self._functions
        fn = partial(functions.commit_revived, name=name, row=row, outputs=outputs, error=error, sinks=sinks)
        await self.call_until_committed(functions.guarded(fn), wake=wake)

    async def read_head(self, stage: str) -> Head | None:
        return await self.call_until_committed(partial(self._functions.read_head, stage=stage))

    async def attempt_head(self, stage: str, head: int, until: int) -> Head:
        functions = self._functions
        fn = partial(functions.attempt_head, stage=stage, head=head, until=until)
        return await self.call_until_committed(functions.guarded(fn))

    # -- windows (wait) ------------------------------------------------------------------------

    async def stored_windows(self, transform: str) -> list[tuple[int, str, float, int]]:
        return await self.call_until_committed(partial(self._functions.stored_windows, transform=transform))

    async def commit_joined(
        self,
        transform: str,
        position: int,
        joined: Sequence[Joined],
        windows: Sequence[Window],
        failures: Sequence[tuple[StoredEvent, str]],
    ) -> None:
        functions = self._functions
        fn = partial(
            functions.commit_joined,
            transform=transform,
            position=position,
            joined=joined,
            windows=windows,
            failures=failures,
        )
        await self.call_until_committed(functions.guarded(fn))

    async def window_contents(self, transform: str, window_ids: Sequence[int]) -> Contents:
        fn = partial(self._functions.window_contents, transform=transform, window_ids=window_ids)
        return await self.call_until_committed(fn)

    async def commit_emitted(
        self, transform: str, emitted: Sequence[Emitted], *, wake: Collection[str] = ()
    ) -> int:
        functions = self._functions
        fn = partial(functions.commit_emitted, transform=transform, emitted=emitted)
        return await self.call_until_committed(functions.guarded(fn), wake=wake)

    # -- deliveries (wait) ---------------------------------------------------------------------

    async def due_deliveries(self, stage: str, now: float, limit: int) -> list[Due]:
        fn = partial(self._functions.due_deliveries, stage=stage, now=now, limit=limit)
        return await self.call_until_committed(fn)

    async def due_ordered(self, ordering: Ordering, stage: str, now: float, limit: int) -> Fetched:
        fn = partial(self._functions.due_ordered, ordering=ordering, stage=stage, now=now, limit=limit)
        return await self.call_until_committed(fn)

    async def next_due_after(self, stage: str, now: float) -> float | None:
        return await self.call_until_committed(partial(self._functions.next_due_after, stage=stage, now=now))

    async def unpark(self, stage: str, now: float, horizon: float) -> int:
        fn = partial(self._functions.unpark, stage=stage, now=now, horizon=horizon)
        return await self.call_until_committed(fn)

    async def record_outcomes(
        self, attempts: Sequence[Attempt], *, ordering: Ordering | None = None, wake: Collection[str] = ()
    ) -> None:
        fn = partial(self._functions.record_outcomes, attempts=attempts, ordering=ordering)
        await self.call_until_committed(fn, wake=wake)

    claim_lease: float | None = None
    """One process by default (SQLite); a shared backend sets it (`daemon.store.api.Deliveries`)."""

    async def renew_claims(self, stage: str, rowids: Sequence[int]) -> set[int]:
        return await self.call_until_committed(
            partial(self._functions.renew_claims, stage=stage, rowids=rowids)
        )

    async def quarantine_head(self, stage: str, quarantine_after: int) -> tuple[Due, int] | None:
        fn = partial(self._functions.quarantine_head, stage=stage, quarantine_after=quarantine_after)
        return await self.call_until_committed(fn)

    # -- polling (wait) ------------------------------------------------------------------------

    async def load_poll_state(self, source: str) -> PollState:
        return await self.call_until_committed(partial(self._functions.load_poll_state, source=source))

    async def save_poll_state(self, source: str, state: PollState) -> None:
        functions = self._functions
        fn = partial(functions.save_poll_state, source=source, state=state)
        await self.call_until_committed(functions.guarded(fn))

    async def load_page_checks(self, source: str) -> dict[int, PageCheck]:
        return await self.call_until_committed(partial(self._functions.load_page_checks, source=source))

    async def commit_pages(
        self,
        source: str,
        pages: Pages,
        sinks: Sequence[str],
        *,
        dedup_window: float,
        trace: str | None = None,
        checks: Sequence[PageCheck] = (),
        wake: Collection[str] = (),
    ) -> list[Committed]:
        functions = self._functions
        fn = partial(
            functions.commit_pages,
            source=source,
            pages=pages,
            sinks=sinks,
            dedup_window=dedup_window,
            trace=trace,
            checks=checks,
        )
        return await self.call_until_committed(functions.guarded(fn), wake=wake)

    # -- control (fail fast) -------------------------------------------------------------------

    async def list_dead(self, selection: DeadFilter, limit: int) -> tuple[int, list[DeadLetter]]:
        return await self.call(partial(self._functions.list_dead, selection=selection, limit=limit))

    async def show_delivery(self, delivery_id: str) -> tuple[str, DeadLetter] | None:
        return await self.call(partial(self._functions.show_delivery, delivery_id=delivery_id))

    async def retry_dead(self, selection: DeadFilter, *, wake: Collection[str] = ()) -> dict[str, int]:
        return await self.call(partial(self._functions.retry_dead, selection=selection), wake=wake)

    async def purge_dead(self, selection: DeadFilter, *, dry_run: bool = False) -> int:
        return await self.call(partial(self._functions.purge_dead, selection=selection, dry_run=dry_run))

    async def record_audit(
        self, *, uid: int | None, pid: int | None, command: str, arguments: str, outcome: str
    ) -> None:
        fn = partial(
            self._functions.record_audit,
            uid=uid,
            pid=pid,
            command=command,
            arguments=arguments,
            outcome=outcome,
        )
        await self.call(fn)

    async def read_audit(self, limit: int) -> list[AuditRow]:
        return await self.call(partial(self._functions.read_audit, limit=limit))

    async def event_outcomes(self, event_id: str) -> EventReport | None:
        return await self.call(partial(self._functions.event_outcomes, event_id=event_id))

    async def counts(self) -> dict[str, dict[str, int]]:
        return await self.call(self._functions.counts)

    async def pending_total(self) -> int:
        return await self.call(self._functions.pending_total)

    async def due_counts(self, stages: Sequence[str], now: float) -> dict[str, int]:
        return await self.call(partial(self._functions.due_counts, stages=stages, now=now))

    async def transform_backlog(self, inputs: Mapping[str, Sequence[str]]) -> dict[str, int]:
        return await self.call(partial(self._functions.transform_backlog, inputs=dict(inputs)))

    async def error_counts(self) -> list[Failure]:
        return await self.call(self._functions.error_counts)

    async def delivery_latencies(self, stage: str) -> list[float]:
        return await self.call(partial(self._functions.delivery_latencies, stage=stage))

    async def replay_selection(
        self, *, source: str, since: float | None, until: float | None, streams: Sequence[str]
    ) -> list[tuple[int, str]]:
        fn = partial(
            self._functions.replay_selection, source=source, since=since, until=until, streams=streams
        )
        return await self.call(fn)

    async def start_replay(
        self, *, source: str, since: float | None, until: float | None, sinks: Sequence[str]
    ) -> int:
        fn = partial(self._functions.start_replay, source=source, since=since, until=until, sinks=sinks)
        return await self.call(fn)

    async def insert_replay(
        self, *, number: int, seqs_by_sink: Mapping[str, Sequence[int]], wake: Collection[str] = ()
    ) -> dict[str, int]:
        fn = partial(self._functions.insert_replay, number=number, seqs_by_sink=seqs_by_sink)
        return await self.call(fn, wake=wake)

    # -- small state (fail fast) ---------------------------------------------------------------

    async def load_alert_states(self) -> dict[str, AlertState]:
        return await self.call(self._functions.load_alert_states)

    async def save_alert_states(self, states: Mapping[str, AlertState], keep: frozenset[str]) -> None:
        functions = self._functions
        fn = partial(functions.save_alert_states, states=dict(states), keep=keep)
        await self.call(functions.guarded(fn))

    async def load_refresh_token(self, owner: str) -> tuple[str, str] | None:
        return await self.call(partial(self._functions.load_refresh_token, owner=owner))

    async def save_refresh_token(self, owner: str, token: str, seed: str) -> None:
        await self.call(partial(self._functions.save_refresh_token, owner=owner, token=token, seed=seed))

    # -- maintenance (wait) --------------------------------------------------------------------

    async def prune(
        self,
        *,
        retention: float,
        archive: float,
        dedup_window: float,
        readers: Mapping[str, Sequence[str]],
        audit_retention: float,
    ) -> int:
        fn = partial(
            _prune,
            functions=self._functions,
            retention=retention,
            archive=archive,
            dedup_window=dedup_window,
            readers=readers,
            audit_retention=audit_retention,
        )
        return await self.call_until_committed(fn)

    async def pending_by_stage(self, stages: Iterable[str]) -> dict[str, int]:
        return await self.call_until_committed(partial(self._functions.pending_by_stage, stages=list(stages)))


__all__ = ["Operations"]
