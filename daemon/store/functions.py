"""What a backend hands the shared domain operations (`daemon.store.operations`): its store functions.

One function per domain operation of `daemon.store.api.Outbox`, named after it, run on the
writer thread inside a group transaction as `fn(conn, ...)` with the operation's arguments by
name; `C` is the backend's connection (SQLite's `sqlite3.Connection`, PostgreSQL's `Db`). The
SQLite backend's table is `daemon.store.sqlite_ops.SqliteFunctions`, PostgreSQL's
`daemon.store.postgres.store.PostgresFunctions`: mypy checks each against this protocol, so a
function whose arguments drift from the operation's is a type error, not a failure at run time.

`guarded(fn)` wraps a singleton's commit in the fencing check of the calling task's lease
(`daemon.store.fencing`); it is called in the operation's own task, where the fence is set. A
backend without leases (SQLite: one node) returns `fn` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

from daemon.store.api import Attempt, Failed, Failure
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
T = TypeVar("T")

Pages = Sequence[tuple[Sequence[str], Sequence[bytes], PollState]]
"""`commit_pages`' pages: each page's item keys, item payloads and the state after it."""
Contents = dict[int, list[tuple[str, bytes, str | None]]]
"""`window_contents`: each window's events (id, payload, trace)."""


class Functions(Protocol[C]):
    """The store functions of one backend, by the name of the operation each serves."""

    def guarded(self, fn: Callable[[C], T], /) -> Callable[[C], T]: ...

    # -- ingest, transforms, windows -----------------------------------------------------------

    def insert_events(
        self, conn: C, /, incoming: Sequence[Incoming], dedup_window: float
    ) -> list[tuple[str, bool]]: ...

    def cursor(self, conn: C, /, name: str) -> int: ...

    def read_events(
        self, conn: C, /, streams: Sequence[str], after: int, limit: int
    ) -> list[StoredEvent]: ...

    def commit_transform(
        self,
        conn: C,
        /,
        name: str,
        position: int,
        outputs: Sequence[Derived],
        failures: Sequence[Failed],
        sinks: Sequence[str],
    ) -> int: ...

    def revived(self, conn: C, /, stage: str, limit: int) -> list[Revived]: ...

    def commit_revived(
        self,
        conn: C,
        /,
        name: str,
        row: Revived,
        outputs: Sequence[Derived],
        error: str | None,
        sinks: Sequence[str],
    ) -> None: ...

    def read_head(self, conn: C, /, stage: str) -> Head | None: ...

    def attempt_head(self, conn: C, /, stage: str, head: int, until: int) -> Head: ...

    def stored_windows(self, conn: C, /, transform: str) -> list[tuple[int, str, float, int]]: ...

    def commit_joined(
        self,
        conn: C,
        /,
        transform: str,
        position: int,
        joined: Sequence[Joined],
        windows: Sequence[Window],
        failures: Sequence[tuple[StoredEvent, str]],
    ) -> None: ...

    def window_contents(self, conn: C, /, transform: str, window_ids: Sequence[int]) -> Contents: ...

    def commit_emitted(self, conn: C, /, transform: str, emitted: Sequence[Emitted]) -> int: ...

    # -- deliveries, polling -------------------------------------------------------------------

    def due_deliveries(self, conn: C, /, stage: str, now: float, limit: int) -> list[Due]: ...

    def due_ordered(self, conn: C, /, ordering: Ordering, stage: str, now: float, limit: int) -> Fetched: ...

    def next_due_after(self, conn: C, /, stage: str, now: float) -> float | None: ...

    def unpark(self, conn: C, /, stage: str, now: float, horizon: float) -> int: ...

    def record_outcomes(self, conn: C, /, attempts: Sequence[Attempt], ordering: Ordering | None) -> None: ...

    def renew_claims(self, conn: C, /, stage: str, rowids: Sequence[int]) -> set[int]: ...

    def quarantine_head(self, conn: C, /, stage: str, quarantine_after: int) -> tuple[Due, int] | None: ...

    def load_poll_state(self, conn: C, /, source: str) -> PollState: ...

    def save_poll_state(self, conn: C, /, source: str, state: PollState) -> None: ...

    def load_page_checks(self, conn: C, /, source: str) -> dict[int, PageCheck]: ...

    def commit_pages(
        self,
        conn: C,
        /,
        source: str,
        pages: Pages,
        sinks: Sequence[str],
        *,
        dedup_window: float,
        trace: str | None,
        checks: Sequence[PageCheck],
    ) -> list[Committed]: ...

    # -- control, small state, maintenance -----------------------------------------------------

    def list_dead(self, conn: C, /, selection: DeadFilter, limit: int) -> tuple[int, list[DeadLetter]]: ...

    def show_delivery(self, conn: C, /, delivery_id: str) -> tuple[str, DeadLetter] | None: ...

    def retry_dead(self, conn: C, /, selection: DeadFilter) -> dict[str, int]: ...

    def purge_dead(self, conn: C, /, selection: DeadFilter, *, dry_run: bool) -> int: ...

    def record_audit(
        self, conn: C, /, *, uid: int | None, pid: int | None, command: str, arguments: str, outcome: str
    ) -> None: ...

    def read_audit(self, conn: C, /, limit: int) -> list[AuditRow]: ...

    def event_outcomes(self, conn: C, /, event_id: str) -> EventReport | None: ...

    def counts(self, conn: C, /) -> dict[str, dict[str, int]]: ...

    def pending_total(self, conn: C, /) -> int: ...

    def due_counts(self, conn: C, /, stages: Sequence[str], now: float) -> dict[str, int]: ...

    def transform_backlog(self, conn: C, /, inputs: dict[str, Sequence[str]]) -> dict[str, int]: ...

    def error_counts(self, conn: C, /) -> list[Failure]: ...

    def delivery_latencies(self, conn: C, /, stage: str) -> list[float]: ...

    def replay_selection(
        self, conn: C, /, *, source: str, since: float | None, until: float | None, streams: Sequence[str]
    ) -> list[tuple[int, str]]: ...

    def start_replay(
        self, conn: C, /, *, source: str, since: float | None, until: float | None, sinks: Sequence[str]
    ) -> int: ...

    def insert_replay(
        self, conn: C, /, *, number: int, seqs_by_sink: Mapping[str, Sequence[int]]
    ) -> dict[str, int]: ...

    def load_alert_states(self, conn: C, /) -> dict[str, AlertState]: ...

    def save_alert_states(
        self, conn: C, /, states: Mapping[str, AlertState], keep: frozenset[str]
    ) -> None: ...

    def load_refresh_token(self, conn: C, /, owner: str) -> tuple[str, str] | None: ...

    def save_refresh_token(self, conn: C, /, owner: str, token: str, seed: str) -> None: ...

    def prune(
        self,
        conn: C,
        /,
        retention: float,
        dedup_window: float,
        readers: dict[str, list[str]],
        *,
        archive: float,
    ) -> int: ...

    def prune_audit(self, conn: C, /, *, retention: float) -> int: ...

    def pending_by_stage(self, conn: C, /, stages: Iterable[str]) -> dict[str, int]: ...


__all__ = ["Contents", "Functions", "Pages"]
