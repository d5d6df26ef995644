"""The SQLite backend of `daemon.store.api.Outbox`: each domain operation runs its store
function on the writer thread, inside the group commit (`daemon.store.sqlite.Store`).

Each method is one `partial` and one call into `Store.call` (fail fast) or
`Store.call_until_committed` (wait it out), as `daemon.store.api` decides per operation: no
other cost on the pipeline's paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import TypeVar

from daemon.store import (
    alerts,
    confirmations,
    ops,
    outbox,
    poll,
    quarantine,
    tokens,
    transform_retry,
)
from daemon.store import ordering as ordering_sql
from daemon.store import windows as window_sql
from daemon.store.alerts import AlertState
from daemon.store.api import Attempt, Failed, Failure
from daemon.store.confirmations import EventReport
from daemon.store.ops import AuditRow, DeadFilter, DeadLetter
from daemon.store.ordering import Fetched, Ordering
from daemon.store.outbox import Connection, Derived, Due, Incoming, StoredEvent
from daemon.store.poll import Committed, PageCheck, PollState
from daemon.store.quarantine import Head
from daemon.store.transform_retry import Revived
from daemon.store.windows import Emitted, Joined, Window

T = TypeVar("T")


def _record_all(conn: Connection, attempts: Sequence[Attempt], ordering: Ordering | None) -> None:
    record = outbox.record_outcomes if ordering is None else ordering_sql.record
    for outcomes, latency, response in attempts:
        record(conn, outcomes, latency, response)


def _prune(
    conn: Connection,
    retention: float,
    archive: float,
    dedup_window: float,
    readers: Mapping[str, Sequence[str]],
) -> int:
    return outbox.prune(
        conn,
        retention=retention,
        dedup_window=dedup_window,
        readers={stream: list(names) for stream, names in readers.items()},
        archive=archive,
    )


class SqliteOperations:
    """The domain operations, on top of `call` and `call_until_committed` (`Store` has them)."""

    async def call(self, fn: Callable[[Connection], T], *, wake: Iterable[str] = ()) -> T:
        raise NotImplementedError

    async def call_until_committed(
        self, fn: Callable[[Connection], T], *, wake: Iterable[str] = (), max_backoff: float = 5.0
    ) -> T:
        raise NotImplementedError

    # -- ingest (fail fast) --------------------------------------------------------------------

    async def insert_events(
        self, incoming: Sequence[Incoming], *, dedup_window: float, wake: Iterable[str] = ()
    ) -> list[tuple[str, bool]]:
        return await self.call(
            partial(outbox.insert_events, incoming=incoming, dedup_window=dedup_window), wake=wake
        )

    # -- transforms (wait) ---------------------------------------------------------------------

    async def cursor(self, name: str) -> int:
        return await self.call_until_committed(partial(outbox.cursor, name=name))

    async def read_events(self, streams: Sequence[str], after: int, limit: int) -> list[StoredEvent]:
        return await self.call_until_committed(
            partial(outbox.read_events, streams=streams, after=after, limit=limit)
        )

    async def commit_transform(
        self,
        name: str,
        position: int,
        outputs: Sequence[Derived],
        failures: Sequence[Failed],
        sinks: Sequence[str],
        *,
        wake: Iterable[str] = (),
    ) -> int:
        return await self.call_until_committed(
            partial(
                outbox.commit_transform,
                name=name,
                position=position,
                outputs=outputs,
                failures=failures,
                sinks=sinks,
            ),
            wake=wake,
        )

    async def revived(self, stage: str, limit: int) -> list[Revived]:
        return await self.call_until_committed(partial(transform_retry.revived, stage=stage, limit=limit))

    async def commit_revived(
        self,
        name: str,
        row: Revived,
        outputs: Sequence[Derived],
        error: str | None,
        sinks: Sequence[str],
        *,
        wake: Iterable[str] = (),
    ) -> None:
        await self.call_until_committed(
            partial(
                transform_retry.commit_revived, name=name, row=row, outputs=outputs, error=error, sinks=sinks
            ),
            wake=wake,
        )

    async def read_head(self, stage: str) -> Head | None:
        return await self.call_until_committed(partial(quarantine.read_head, stage=stage))

    async def attempt_head(self, stage: str, head: int, until: int) -> Head:
        return await self.call_until_committed(
            partial(quarantine.attempt_head, stage=stage, head=head, until=until)
        )

    # -- windows (wait) ------------------------------------------------------------------------

    async def stored_windows(self, transform: str) -> list[tuple[int, str, float, int]]:
        return await self.call_until_committed(partial(window_sql.stored_windows, transform=transform))

    async def commit_joined(
        self,
        transform: str,
        position: int,
        joined: Sequence[Joined],
        windows: Sequence[Window],
        failures: Sequence[tuple[StoredEvent, str]],
    ) -> None:
        await self.call_until_committed(
            partial(
                window_sql.commit_joined,
                transform=transform,
                position=position,
                joined=joined,
                windows=windows,
                failures=failures,
            )
        )

    async def window_contents(
        self, transform: str, window_ids: Sequence[int]
    ) -> dict[int, list[tuple[str, bytes, str | None]]]:
        return await self.call_until_committed(
            partial(window_sql.window_contents, transform=transform, window_ids=window_ids)
        )

    async def commit_emitted(
        self, transform: str, emitted: Sequence[Emitted], *, wake: Iterable[str] = ()
    ) -> int:
        return await self.call_until_committed(
            partial(window_sql.commit_emitted, transform=transform, emitted=emitted), wake=wake
        )

    # -- deliveries (wait) ---------------------------------------------------------------------

    async def due_deliveries(self, stage: str, now: float, limit: int) -> list[Due]:
        return await self.call_until_committed(
            partial(outbox.due_deliveries, stage=stage, now=now, limit=limit)
        )

    async def due_ordered(self, ordering: Ordering, stage: str, now: float, limit: int) -> Fetched:
        return await self.call_until_committed(
            partial(ordering_sql.due, ordering=ordering, stage=stage, now=now, limit=limit)
        )

    async def next_due_after(self, stage: str, now: float) -> float | None:
        return await self.call_until_committed(partial(outbox.next_due_after, stage=stage, now=now))

    async def unpark(self, stage: str, now: float, horizon: float) -> int:
        return await self.call_until_committed(partial(outbox.unpark, stage=stage, now=now, horizon=horizon))

    async def record_outcomes(
        self, attempts: Sequence[Attempt], *, ordering: Ordering | None = None, wake: Iterable[str] = ()
    ) -> None:
        await self.call_until_committed(partial(_record_all, attempts=attempts, ordering=ordering), wake=wake)

    async def quarantine_head(self, stage: str, quarantine_after: int) -> tuple[Due, int] | None:
        return await self.call_until_committed(
            partial(quarantine.check_head, stage=stage, quarantine_after=quarantine_after)
        )

    # -- polling (wait) ------------------------------------------------------------------------

    async def load_poll_state(self, source: str) -> PollState:
        return await self.call_until_committed(partial(poll.load_state, source=source))

    async def save_poll_state(self, source: str, state: PollState) -> None:
        await self.call_until_committed(partial(poll.save_state, source=source, state=state))

    async def load_page_checks(self, source: str) -> dict[int, PageCheck]:
        return await self.call_until_committed(partial(poll.load_checks, source=source))

    async def commit_pages(
        self,
        source: str,
        pages: Sequence[tuple[Sequence[str], Sequence[bytes], PollState]],
        sinks: Sequence[str],
        *,
        dedup_window: float,
        trace: str | None = None,
        checks: Sequence[PageCheck] = (),
        wake: Iterable[str] = (),
    ) -> list[Committed]:
        return await self.call_until_committed(
            partial(
                poll.commit_pages,
                source=source,
                pages=pages,
                sinks=sinks,
                dedup_window=dedup_window,
                trace=trace,
                checks=checks,
            ),
            wake=wake,
        )

    # -- control (fail fast) -------------------------------------------------------------------

    async def list_dead(self, selection: DeadFilter, limit: int) -> tuple[int, list[DeadLetter]]:
        return await self.call(partial(ops.list_dead, selection=selection, limit=limit))

    async def show_delivery(self, delivery_id: str) -> tuple[str, DeadLetter] | None:
        return await self.call(partial(ops.show_delivery, delivery_id=delivery_id))

    async def retry_dead(self, selection: DeadFilter, *, wake: Iterable[str] = ()) -> dict[str, int]:
        return await self.call(partial(ops.retry_dead, selection=selection), wake=wake)

    async def purge_dead(self, selection: DeadFilter, *, dry_run: bool = False) -> int:
        return await self.call(partial(ops.purge_dead, selection=selection, dry_run=dry_run))

    async def record_audit(
        self, *, uid: int | None, pid: int | None, command: str, arguments: str, outcome: str
    ) -> None:
        await self.call(
            partial(ops.record_audit, uid=uid, pid=pid, command=command, arguments=arguments, outcome=outcome)
        )

    async def read_audit(self, limit: int) -> list[AuditRow]:
        return await self.call(partial(ops.read_audit, limit=limit))

    async def event_outcomes(self, event_id: str) -> EventReport | None:
        return await self.call(partial(confirmations.event_outcomes, event_id=event_id))

    async def counts(self) -> dict[str, dict[str, int]]:
        return await self.call(outbox.counts)

    async def pending_total(self) -> int:
        return await self.call(outbox.pending_total)

    async def due_counts(self, stages: Sequence[str], now: float) -> dict[str, int]:
        return await self.call(partial(ops.due_counts, stages=stages, now=now))

    async def transform_backlog(self, inputs: Mapping[str, Sequence[str]]) -> dict[str, int]:
        return await self.call(partial(ops.transform_backlog, inputs=dict(inputs)))

    async def error_counts(self) -> list[Failure]:
        return await self.call(ops.error_counts)

    async def delivery_latencies(self, stage: str) -> list[float]:
        return await self.call(partial(ops.delivery_latencies, stage=stage))

    async def replay_selection(
        self, *, source: str, since: float | None, until: float | None, streams: Sequence[str]
    ) -> list[tuple[int, str]]:
        return await self.call(
            partial(ops.replay_selection, source=source, since=since, until=until, streams=streams)
        )

    async def start_replay(
        self, *, source: str, since: float | None, until: float | None, sinks: Sequence[str]
    ) -> int:
        return await self.call(
            partial(ops.start_replay, source=source, since=since, until=until, sinks=sinks)
        )

    async def insert_replay(
        self, *, number: int, seqs_by_sink: Mapping[str, Sequence[int]], wake: Iterable[str] = ()
    ) -> dict[str, int]:
        return await self.call(
            partial(ops.insert_replay, number=number, seqs_by_sink=seqs_by_sink), wake=wake
        )

    # -- small state (fail fast) ---------------------------------------------------------------

    async def load_alert_states(self) -> dict[str, AlertState]:
        return await self.call(alerts.load_states)

    async def save_alert_states(self, states: Mapping[str, AlertState], keep: frozenset[str]) -> None:
        await self.call(partial(alerts.save_states, states=dict(states), keep=keep))

    async def load_refresh_token(self, owner: str) -> tuple[str, str] | None:
        return await self.call(partial(tokens.load_refresh_token, owner=owner))

    async def save_refresh_token(self, owner: str, token: str, seed: str) -> None:
        await self.call(partial(tokens.save_refresh_token, owner=owner, token=token, seed=seed))

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
        removed = await self.call_until_committed(
            partial(_prune, retention=retention, archive=archive, dedup_window=dedup_window, readers=readers)
        )
        return removed + await self.call_until_committed(partial(ops.prune_audit, retention=audit_retention))

    async def pending_by_stage(self, stages: Iterable[str]) -> dict[str, int]:
        return await self.call_until_committed(partial(ops.pending_by_stage, stages=list(stages)))
