"""`PostgresStore`: the outbox on a PostgreSQL server, shared by several ferry nodes.

The same interface (`daemon.store.api.Outbox`), guarantees and failure policies as SQLite's
`Store`, on the same group-commit engine (`daemon.store.engine`): one writer thread owns one
psycopg connection (psycopg's sync API: its async one needs asyncio) and commits the requests
waiting in its queue as one transaction, `synchronous_commit` on. Each method is one `partial`
and one `call` (fail fast) or `call_until_committed` (wait it out), as `daemon.store.api`
decides per operation.

What differs, and why (`daemon.store.postgres.connect`, `.outbox`, `.deliveries`):
    - the server can be unreachable: a request fails with `StoreUnavailable` (a webhook answers
      503), and the writer reconnects with backoff by itself;
    - events commit in seq order across nodes (the events lock), so cursors never skip one;
    - deliveries are claimed with a lease (`node`, `lease` seconds) so two nodes never hold one
      at once while the lease holds, and outcomes are recorded only by the lease's holder;
    - the schema is migrated once under an advisory lock; a node whose code does not match the
      database's version refuses to start (`StoreCorrupt`, exit 2).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import final

from daemon.store.api import Attempt, Failed, Failure, Outbox
from daemon.store.at_rest import Cipher
from daemon.store.engine import GroupCommit
from daemon.store.keying import Fetched, Ordering
from daemon.store.postgres import confirmations, deliveries, ops, outbox, stages
from daemon.store.postgres.connect import Db, PostgresTransactions, describe, open_database
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

DEFAULT_LEASE = 60.0
"""Seconds a claimed delivery stays this node's without a new fetch (`[cluster] delivery_lease`)."""


def _prune(
    db: Db,
    retention: float,
    archive: float,
    dedup_window: float,
    readers: Mapping[str, Sequence[str]],
    audit_retention: float,
) -> int:
    removed = outbox.prune(
        db,
        retention=retention,
        dedup_window=dedup_window,
        readers={stream: list(names) for stream, names in readers.items()},
        archive=archive,
    )
    return removed + ops.prune_audit(db, retention=audit_retention)


@final
class PostgresStore(GroupCommit[Db]):
    """The outbox on PostgreSQL. Open with `PostgresStore.open(url, node=...)`, serve with
    `await nursery.start(store.run)`, `close()` after."""

    def __init__(self, url: str, *, node: str, lease: float, max_batch: int, cipher: Cipher | None) -> None:
        super().__init__(max_batch=max_batch, thread_name="ferry-store-pg")
        self.url = url
        self.node = node
        self.lease = lease
        self._cipher = cipher

    def __repr__(self) -> str:
        return f"<PostgresStore {describe(self.url)} node={self.node!r}>"

    @classmethod
    def open(
        cls,
        url: str,
        *,
        node: str,
        lease: float = DEFAULT_LEASE,
        max_batch: int = 4096,
        cipher: Cipher | None = None,
    ) -> PostgresStore:
        """Connect, migrate (once, under the schema lock) and check; see `connect.open_database`.

        Raises `StoreUnavailable` (no server), `StoreCorrupt` (not ferry's database, or another
        schema version) or `StoreKeyMissing`: the daemon refuses to start (exit 2).
        """
        store = cls(url, node=node, lease=lease, max_batch=max_batch, cipher=cipher)
        conn = open_database(url, node=node, cipher=cipher)
        store._transactions = PostgresTransactions(url, conn, cipher=cipher, node=node, lease=lease)
        return store

    def close(self) -> None:
        """Close the connection (after `run` has returned)."""
        transactions = self._transactions
        if isinstance(transactions, PostgresTransactions):
            transactions.close()

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
        fn = partial(
            outbox.commit_transform,
            name=name,
            position=position,
            outputs=outputs,
            failures=failures,
            sinks=sinks,
        )
        return await self.call_until_committed(fn, wake=wake)

    async def revived(self, stage: str, limit: int) -> list[Revived]:
        return await self.call_until_committed(partial(stages.revived, stage=stage, limit=limit))

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
        fn = partial(stages.commit_revived, name=name, row=row, outputs=outputs, error=error, sinks=sinks)
        await self.call_until_committed(fn, wake=wake)

    async def read_head(self, stage: str) -> Head | None:
        return await self.call_until_committed(partial(deliveries.read_head, stage=stage))

    async def attempt_head(self, stage: str, head: int, until: int) -> Head:
        return await self.call_until_committed(
            partial(deliveries.attempt_head, stage=stage, head=head, until=until)
        )

    # -- windows (wait) ------------------------------------------------------------------------

    async def stored_windows(self, transform: str) -> list[tuple[int, str, float, int]]:
        return await self.call_until_committed(partial(stages.stored_windows, transform=transform))

    async def commit_joined(
        self,
        transform: str,
        position: int,
        joined: Sequence[Joined],
        windows: Sequence[Window],
        failures: Sequence[tuple[StoredEvent, str]],
    ) -> None:
        fn = partial(
            stages.commit_joined,
            transform=transform,
            position=position,
            joined=joined,
            windows=windows,
            failures=failures,
        )
        await self.call_until_committed(fn)

    async def window_contents(
        self, transform: str, window_ids: Sequence[int]
    ) -> dict[int, list[tuple[str, bytes, str | None]]]:
        return await self.call_until_committed(
            partial(stages.window_contents, transform=transform, window_ids=window_ids)
        )

    async def commit_emitted(
        self, transform: str, emitted: Sequence[Emitted], *, wake: Iterable[str] = ()
    ) -> int:
        return await self.call_until_committed(
            partial(stages.commit_emitted, transform=transform, emitted=emitted), wake=wake
        )

    # -- deliveries (wait) ---------------------------------------------------------------------

    async def due_deliveries(self, stage: str, now: float, limit: int) -> list[Due]:
        return await self.call_until_committed(
            partial(deliveries.due_deliveries, stage=stage, now=now, limit=limit)
        )

    async def due_ordered(self, ordering: Ordering, stage: str, now: float, limit: int) -> Fetched:
        return await self.call_until_committed(
            partial(deliveries.due_ordered, ordering=ordering, stage=stage, now=now, limit=limit)
        )

    async def next_due_after(self, stage: str, now: float) -> float | None:
        return await self.call_until_committed(partial(deliveries.next_due_after, stage=stage, now=now))

    async def unpark(self, stage: str, now: float, horizon: float) -> int:
        return await self.call_until_committed(
            partial(deliveries.unpark, stage=stage, now=now, horizon=horizon)
        )

    async def record_outcomes(
        self, attempts: Sequence[Attempt], *, ordering: Ordering | None = None, wake: Iterable[str] = ()
    ) -> None:
        await self.call_until_committed(
            partial(deliveries.record_outcomes, attempts=attempts, ordering=ordering), wake=wake
        )

    async def quarantine_head(self, stage: str, quarantine_after: int) -> tuple[Due, int] | None:
        return await self.call_until_committed(
            partial(deliveries.check_head, stage=stage, quarantine_after=quarantine_after)
        )

    # -- polling (wait) ------------------------------------------------------------------------

    async def load_poll_state(self, source: str) -> PollState:
        return await self.call_until_committed(partial(stages.load_state, source=source))

    async def save_poll_state(self, source: str, state: PollState) -> None:
        await self.call_until_committed(partial(stages.save_state, source=source, state=state))

    async def load_page_checks(self, source: str) -> dict[int, PageCheck]:
        return await self.call_until_committed(partial(stages.load_checks, source=source))

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
        fn = partial(
            stages.commit_pages,
            source=source,
            pages=pages,
            sinks=sinks,
            dedup_window=dedup_window,
            trace=trace,
            checks=checks,
        )
        return await self.call_until_committed(fn, wake=wake)

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
        fn = partial(ops.start_replay, source=source, since=since, until=until, sinks=sinks)
        return await self.call(fn)

    async def insert_replay(
        self, *, number: int, seqs_by_sink: Mapping[str, Sequence[int]], wake: Iterable[str] = ()
    ) -> dict[str, int]:
        fn = partial(ops.insert_replay, number=number, seqs_by_sink=seqs_by_sink)
        return await self.call(fn, wake=wake)

    # -- small state (fail fast) ---------------------------------------------------------------

    async def load_alert_states(self) -> dict[str, AlertState]:
        return await self.call(stages.load_alert_states)

    async def save_alert_states(self, states: Mapping[str, AlertState], keep: frozenset[str]) -> None:
        await self.call(partial(stages.save_alert_states, states=dict(states), keep=keep))

    async def load_refresh_token(self, owner: str) -> tuple[str, str] | None:
        return await self.call(partial(stages.load_refresh_token, owner=owner))

    async def save_refresh_token(self, owner: str, token: str, seed: str) -> None:
        await self.call(partial(stages.save_refresh_token, owner=owner, token=token, seed=seed))

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
        return await self.call_until_committed(
            partial(
                _prune,
                retention=retention,
                archive=archive,
                dedup_window=dedup_window,
                readers=readers,
                audit_retention=audit_retention,
            )
        )

    async def pending_by_stage(self, stages: Iterable[str]) -> dict[str, int]:
        return await self.call_until_committed(partial(ops.pending_by_stage, stages=list(stages)))


def _implements_outbox(store: PostgresStore) -> Outbox:
    """mypy checks here that `PostgresStore` implements the whole interface."""
    return store
