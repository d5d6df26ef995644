"""The store's interface: every domain operation on the outbox, async, backend-neutral.

Every component reaches the outbox through `Outbox` (composed of the protocols below, one per
area); nothing outside `daemon/store/` writes SQL, holds a connection, or passes a function to
run inside a transaction. Two backends implement it — SQLite (`daemon.store.sqlite.Store`) and
PostgreSQL (`daemon.store.postgres.store.PostgresStore`) — with the operations written once
(`daemon.store.operations`) over each backend's store functions (`daemon.store.functions`), and
`tests/daemon/store/test_conformance.py` runs against either.

Guarantees every backend gives:
    An operation returns only after the transaction holding its writes has committed (one
    transaction per operation; a backend may commit many operations together, as SQLite's group
    commit does, but never acknowledges one before its commit). An operation that raises wrote
    nothing.

Wake-ups (`wake=`):
    A writing operation names the consumers its rows concern (stage names). After the commit,
    and only if it committed, the backend fires those consumers' `Signal`s (`signal(name)`);
    consumers then read their rows back in order. Memory never holds the only copy of anything.

Failure policies (decided per operation, by who calls it; stated on each protocol):
    *fail fast* — the operation raises `StoreUnavailable` when the commit fails (disk full, I/O
    error, server gone): the webhook's `insert_events` (answered 503), the control commands,
    the OAuth2 refresh tokens (the delivery is retried), the alerter's state (stored again at
    its next evaluation). Somebody is waiting for an answer, or a retry is already built in.
    *wait it out* — the operation retries with capped backoff until it commits (or the store is
    stopping, then `StoreUnavailable`): everything the stages do (transforms, windows,
    deliveries, polling, quarantine, maintenance). Nobody can be answered there, and a stage
    must neither crash-loop nor forget an outcome during an outage.
    Any other exception (a bad request) is raised as is, and the operation wrote nothing.

Value types are the store's own (`StoredEvent`, `Due`, `Outcomes`, `PollState`, …): plain
NamedTuples, dataclasses and msgspec Structs, no driver types. Ids, wherever they are made:
an event id is `outbox.new_event_id`, a derived one `PARENT.TRANSFORM[.N]`, a delivery id
`outbox.delivery_id(event_id, stage)` (the receiver's Idempotency-Key).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Protocol, final

import trio

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
    Outcomes,
    PageCheck,
    PollState,
    Revived,
    StoredEvent,
)
from daemon.store.windowing import Emitted, Joined, Window

Attempt = tuple[Outcomes, "float | None", "str | None"]
"""One attempt's outcomes, with its latency (s) and an excerpt of the receiver's answer."""

Failed = tuple[StoredEvent, str] | tuple[StoredEvent, str, int]
"""A transform's dead letter: (event, reason) or (event, reason, attempts)."""

Failure = tuple[str, str, "int | None", int, str]
"""(stage, "retrying" or "dead", last status, count, error type) of failed deliveries (`ferry ctl stats`)."""


@final
class Signal:
    """A coalescing wake-up for one consumer: many `fire()`s before a `wait()` count once."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()

    def __repr__(self) -> str:
        return f"<Signal {'fired' if self._event.is_set() else 'idle'}>"


class Lifecycle(Protocol):
    """Wake-ups and readiness."""

    def signal(self, consumer: str) -> Signal:
        """The wake-up of `consumer` (created on first use), fired after commits that name it."""
        ...

    @property
    def writable(self) -> bool:
        """Whether commits succeed now (readiness follows this)."""
        ...


class Ingest(Protocol):
    """Events from sources. Fails fast (the webhook answers 503)."""

    async def insert_events(
        self, incoming: Sequence[Incoming], *, dedup_window: float, wake: Collection[str] = ()
    ) -> list[tuple[str, bool]]:
        """Store events and their deliveries; (event id, duplicate) for each, in order.

        An event whose `dedup_key` was stored for its stream within `dedup_window` (or earlier in
        this call) stores nothing and returns the original's id; one whose `replay` key is still
        remembered stores nothing and returns `("", True)`.
        """
        ...


class Transforms(Protocol):
    """A transform's cursor, outputs and dead letters, and its quarantine head. Waits it out."""

    async def cursor(self, name: str) -> int:
        """The last event seq transform `name` has handled (0 when new)."""
        ...

    async def read_events(self, streams: Sequence[str], after: int, limit: int) -> list[StoredEvent]:
        """Events of `streams` with seq > `after`, in seq order, at most `limit`."""
        ...

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
        """Outputs (ids `PARENT.NAME[.N]`) with their deliveries, dead letters (stage `name`) and
        the cursor at `position`, all or nothing. Returns how many events were stored."""
        ...

    async def revived(self, stage: str, limit: int) -> list[Revived]:
        """Dead letters of transform `stage` an operator retried, oldest first."""
        ...

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
        """A retried event's outputs with its row marked delivered, or its row dead again with `error`."""
        ...

    async def read_head(self, stage: str) -> Head | None:
        """The head `stage` recorded last (`daemon.store.quarantine`), or None."""
        ...

    async def attempt_head(self, stage: str, head: int, until: int) -> Head:
        """Record that `stage` begins work at `head` (batch up to `until`); its attempts so far."""
        ...


class Windows(Protocol):
    """An aggregating transform's windows. Waits it out."""

    async def stored_windows(self, transform: str) -> list[tuple[int, str, float, int]]:
        """The transform's open windows (id, key, opened_at, size), oldest first."""
        ...

    async def commit_joined(
        self,
        transform: str,
        position: int,
        joined: Sequence[Joined],
        windows: Sequence[Window],
        failures: Sequence[tuple[StoredEvent, str]],
    ) -> None:
        """A batch's outputs into their windows, the windows' sizes, dead letters and the cursor."""
        ...

    async def window_contents(
        self, transform: str, window_ids: Sequence[int]
    ) -> dict[int, list[tuple[str, bytes, str | None]]]:
        """Each window's events (id, payload, trace), in the order they joined."""
        ...

    async def commit_emitted(
        self, transform: str, emitted: Sequence[Emitted], *, wake: Collection[str] = ()
    ) -> int:
        """Each closed window's event and deliveries (or dead letter), and its removal."""
        ...


class Deliveries(Protocol):
    """A sink's due deliveries and their outcomes. Waits it out."""

    async def due_deliveries(self, stage: str, now: float, limit: int) -> list[Due]:
        """Pending deliveries of `stage` due at `now`, oldest schedule first."""
        ...

    async def due_ordered(self, ordering: Ordering, stage: str, now: float, limit: int) -> Fetched:
        """`due_deliveries` for a sink with `ordering`: one head per record key, stale ones settled."""
        ...

    async def next_due_after(self, stage: str, now: float) -> float | None:
        """When the next pending delivery of `stage` not due at `now` becomes due, or None."""
        ...

    @property
    def claim_lease(self) -> float | None:
        """Seconds a delivery a fetch returned stays this node's, counted from the fetch's start;
        None when no other process shares the store (nothing can take it)."""
        ...

    async def renew_claims(self, stage: str, rowids: Sequence[int]) -> set[int]:
        """Extend this node's claim on these pending deliveries by a whole lease; the ones it
        still holds (another node may have claimed the others since, or they are finished)."""
        ...

    async def unpark(self, stage: str, now: float, horizon: float) -> int:
        """Make due now the pending deliveries scheduled more than `horizon` s ahead; how many."""
        ...

    async def record_outcomes(
        self, attempts: Sequence[Attempt], *, ordering: Ordering | None = None, wake: Collection[str] = ()
    ) -> None:
        """Each attempt's rows delivered, scheduled again, or dead (one attempt counted each);
        with `ordering`, the record keys' delivered versions too. All attempts or none."""
        ...

    async def quarantine_head(self, stage: str, quarantine_after: int) -> tuple[Due, int] | None:
        """Record `stage`'s head delivery; dead-letter it (returned with its count) when it was
        the head of more than `quarantine_after` incarnations."""
        ...


class Polling(Protocol):
    """A poll source's position, page checks and pages. Waits it out."""

    async def load_poll_state(self, source: str) -> PollState:
        """`source`'s stored state (a fresh one when new)."""
        ...

    async def save_poll_state(self, source: str, state: PollState) -> None: ...

    async def load_page_checks(self, source: str) -> dict[int, PageCheck]:
        """`source`'s stored page checks by position."""
        ...

    async def commit_pages(
        self,
        source: str,
        pages: Sequence[tuple[Sequence[str], Sequence[bytes], PollState]],
        sinks: Sequence[str],
        *,
        dedup_window: float,
        trace: str | None = None,
        checks: Sequence[PageCheck] = (),
        wake: Collection[str] = (),
    ) -> list[Committed]:
        """Each page's new items (by key, within `dedup_window`) with their deliveries, the last
        page's state and `checks`, in one transaction."""
        ...


class Control(Protocol):
    """What `ferry ctl` reads and changes: dead letters, replay, audit, counts. Fails fast."""

    async def list_dead(self, selection: DeadFilter, limit: int) -> tuple[int, list[DeadLetter]]: ...

    async def show_delivery(self, delivery_id: str) -> tuple[str, DeadLetter] | None: ...

    async def retry_dead(self, selection: DeadFilter, *, wake: Collection[str] = ()) -> dict[str, int]:
        """Matching dead letters pending again (same ids), due now; how many per stage."""
        ...

    async def purge_dead(self, selection: DeadFilter, *, dry_run: bool = False) -> int: ...

    async def record_audit(
        self, *, uid: int | None, pid: int | None, command: str, arguments: str, outcome: str
    ) -> None: ...

    async def read_audit(self, limit: int) -> list[AuditRow]:
        """The newest `limit` audit rows, oldest first."""
        ...

    async def event_outcomes(self, event_id: str) -> EventReport | None: ...

    async def counts(self) -> dict[str, dict[str, int]]:
        """Deliveries per stage and state name."""
        ...

    async def pending_total(self) -> int: ...

    async def due_counts(self, stages: Sequence[str], now: float) -> dict[str, int]: ...

    async def transform_backlog(self, inputs: Mapping[str, Sequence[str]]) -> dict[str, int]: ...

    async def error_counts(self) -> list[Failure]: ...

    async def delivery_latencies(self, stage: str) -> list[float]: ...

    async def replay_selection(
        self, *, source: str, since: float | None, until: float | None, streams: Sequence[str]
    ) -> list[tuple[int, str]]: ...

    async def start_replay(
        self, *, source: str, since: float | None, until: float | None, sinks: Sequence[str]
    ) -> int: ...

    async def insert_replay(
        self, *, number: int, seqs_by_sink: Mapping[str, Sequence[int]], wake: Collection[str] = ()
    ) -> dict[str, int]: ...


class State(Protocol):
    """Small durable records: alert rule states, OAuth2 refresh tokens. Fails fast."""

    async def load_alert_states(self) -> dict[str, AlertState]: ...

    async def save_alert_states(self, states: Mapping[str, AlertState], keep: frozenset[str]) -> None:
        """Store `states`; forget stored rules not in `keep`."""
        ...

    async def load_refresh_token(self, owner: str) -> tuple[str, str] | None:
        """`owner`'s stored refresh token and the fingerprint of the configured one it descends from."""
        ...

    async def save_refresh_token(self, owner: str, token: str, seed: str) -> None: ...


class Maintenance(Protocol):
    """Pruning and gauges. Waits it out."""

    async def prune(
        self,
        *,
        retention: float,
        archive: float,
        dedup_window: float,
        readers: Mapping[str, Sequence[str]],
        audit_retention: float,
    ) -> int:
        """Delete what nothing needs any more (bounded per call); how many rows."""
        ...

    async def pending_by_stage(self, stages: Iterable[str]) -> dict[str, int]:
        """Pending deliveries per stage (0 for a stage with none)."""
        ...


class Outbox(
    Lifecycle, Ingest, Transforms, Windows, Deliveries, Polling, Control, State, Maintenance, Protocol
):
    """The whole store, as every component sees it."""


__all__ = [
    "Attempt",
    "Control",
    "Deliveries",
    "Failed",
    "Failure",
    "Ingest",
    "Lifecycle",
    "Maintenance",
    "Outbox",
    "Polling",
    "Signal",
    "State",
    "Transforms",
    "Windows",
]
