"""The store's value types and id formulas: backend-neutral (no driver, no SQL).

Every backend (`daemon.store.sqlite`, `daemon.store.postgres`) reads and writes these, and
`daemon.store.api` names them in its protocols. The modules of each area re-export the types
they used to define (`daemon.store.outbox.Due` is this `Due`), so callers keep their imports.

Ids: an event id is `new_event_id`, a derived one `derived_id` (`PARENT.TRANSFORM[.N]`), a
delivery id `delivery_id(event_id, stage)` (the receiver's Idempotency-Key). The formulas are
written here once, so both backends make the same ids for the same rows.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final, Literal, NamedTuple

import msgspec

# -- delivery states (daemon.store.schema) -------------------------------------------------------

PENDING, DELIVERED, DEAD, STALE = 0, 1, 2, 3
STATE_NAMES = ("pending", "delivered", "dead", "stale")

# -- events and deliveries (daemon.store.outbox) -------------------------------------------------


class StoredEvent(NamedTuple):
    seq: int
    id: str
    stream: str
    payload: bytes
    trace: str | None


class Due(NamedTuple):
    """A pending delivery that is due, with the payload of its event."""

    rowid: int
    id: str
    attempts: int
    created_at: float
    payload: bytes
    trace: str | None
    event_id: str


class Derived(NamedTuple):
    """One output of a transform: the event it came from, which output it is, its JSON, and the
    sinks it goes to (None: every sink reading the transform; fewer when the transform routes)."""

    parent: StoredEvent
    nth: int
    payload: bytes
    sinks: Sequence[str] | None = None


def new_event_id(now: float) -> str:
    """A time-ordered, globally unique event id: 11 hex digits of milliseconds + 16 random."""
    return f"{int(now * 1000):011x}{os.urandom(8).hex()}"


def delivery_id(event_id: str, stage: str) -> str:
    """The stable id of an event's delivery to one sink; sent as its idempotency key.

    The one place this formula is written (a dead letter of a transform is its delivery id
    for the transform's stage; a replay's is this plus `.rN`, `ops.insert_replay`)."""
    return f"{event_id}.{stage}"


def derived_id(parent_id: str, transform: str, nth: int) -> str:
    """The id of a transform's `nth` output of an event: `PARENT.TRANSFORM[.N]`, so a re-run after
    a crash reproduces it (and the delivery ids, the idempotency keys, downstream)."""
    return f"{parent_id}.{transform}" if nth == 0 else f"{parent_id}.{transform}.{nth}"


NewEvent = tuple[str, str, bytes, "str | None", Sequence[str]]
"""An event to store: (id, stream, payload in clear, trace, the sinks of its pending deliveries).
A plain tuple, not a NamedTuple: building one per event is on the pipeline's hot paths."""


class NewDeadLetter(NamedTuple):
    """A stage's dead letter of a stored event (its delivery id is `delivery_id(event_id, stage)`)."""

    event_id: str
    seq: int
    stage: str
    error: str
    attempts: int = 1


class Incoming(NamedTuple):
    """One event a source received, waiting to be stored."""

    stream: str
    payload: bytes
    trace: str | None
    sinks: Sequence[str]
    dedup_key: str | None = None
    replay: tuple[str, float] | None = None
    """(key, until) of a verified webhook: refused while the key is remembered (`insert_events`)."""


class Outcomes(NamedTuple):
    """What became of a set of attempts."""

    delivered: list[tuple[int, int | None]]  # (rowid, status)
    retry: list[tuple[int, float, int | None, str]]  # (rowid, next_attempt_at, status, error)
    dead: list[tuple[int, int | None, str]]  # (rowid, status, error)


# -- dead letters, audit (daemon.store.ops) ------------------------------------------------------


class DeadFilter(NamedTuple):
    """Which dead letters a command is about; empty fields match everything."""

    ids: Sequence[str] = ()
    stages: Sequence[str] = ()
    since: float | None = None  # seconds: dead-lettered at most this long ago
    error: str | None = None  # substring of last_error, any case


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """One dead delivery as `ferry ctl dlq list/show` reports it."""

    id: str
    sink: str
    attempts: int
    created_at: float
    finished_at: float | None
    last_status: int | None
    last_error: str | None
    event_id: str | None = None
    payload: Any = None


def _letter(
    id_: str,
    stage: str,
    attempts: int,
    created: float,
    finished: float | None,
    status: int | None,
    error: str | None,
    event_id: str | None = None,
    payload: Any = None,
) -> DeadLetter:
    """A DeadLetter from a deliveries row in the column order both queries select."""
    return DeadLetter(
        id=id_,
        sink=stage,
        attempts=attempts,
        created_at=created,
        finished_at=finished,
        last_status=status,
        last_error=error,
        event_id=event_id,
        payload=payload,
    )


def percentile(sorted_values: list[float], share: float) -> float:
    """Nearest-rank percentile (`share` in 0..1) of an ascending, non-empty list."""
    rank = max(1, math.ceil(share * len(sorted_values)))
    return sorted_values[rank - 1]


class AuditRow(msgspec.Struct, frozen=True, kw_only=True):
    """One line of the control audit trail."""

    at: float
    uid: int | None
    pid: int | None
    command: str
    arguments: str
    outcome: str


# -- crash quarantine (daemon.store.quarantine) --------------------------------------------------


class Head(NamedTuple):
    """A stage's recorded head: the event seq, the end of the batch begun there, the attempts."""

    head: int
    until: int
    attempts: int


def careful_until(head: Head | None, position: int) -> int:
    """The last seq to work on one event at a time, given the recorded head and the cursor.

    0 (never careful) unless the cursor is still before the recorded head.
    """
    if head is None or position >= head.head:
        return 0
    return head.until


def quarantine_reason(stage: str, attempts: int) -> str:
    """The dead letter's error for an event quarantined at the head of `stage`."""
    return (
        f"poison: quarantined: {stage} was working on this event {attempts} times when it crashed "
        "or was killed, without getting past it"
    )


# -- retried transform dead letters (daemon.store.transform_retry) -------------------------------


class Revived(NamedTuple):
    """A retried dead letter of a transform: its row, its attempts so far, and its event."""

    rowid: int
    attempts: int
    event: StoredEvent


# -- poll sources (daemon.store.poll) ------------------------------------------------------------


@dataclass
class PollState:
    """A poll source's durable state (one `poll_state` row).

    `mark`, `etag`, `last_modified`, `validated_url` (the first page's URL and validators) and
    `refreshed` belong to the last *complete* listing; the `cycle_*` fields, `pages` and
    `next_url` to the listing in progress (`next_url` None: none). `refreshed` is the oldest
    time at which a page of that listing was last read in full (its items' keys refreshed in
    `dedup`). `job` is the submitted job being watched (JSON), in job mode.
    """

    mark: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    validated_url: str | None = None
    next_url: str | None = None
    cycle_mark: str | None = None
    cycle_etag: str | None = None
    cycle_last_modified: str | None = None
    cycle_url: str | None = None
    pages: int = 0
    job: str | None = None
    cycles: int = 0
    refreshed: float | None = None
    cycle_refreshed: float | None = None


_COLUMNS: Final = [f.name for f in fields(PollState)]


@dataclass(frozen=True, slots=True)
class PageCheck:
    """What ferry knows of the page at `position` of a listing, last read in full from `url`.

    Its validators (`etag`, `last_modified`; None: the answer had none ferry trusts), the next
    page's URL that answer led to (`next_url`, None: it ended the listing), the highest mark of
    its items as the API wrote it, and when it was read (`refreshed_at`: its items' keys were
    refreshed then). One `poll_pages` row per (source, position), positions 1 to
    `actors.poll.checks.CHECKED_PAGES`: bounded whatever the listing's length.
    """

    position: int
    url: str
    etag: str | None
    last_modified: str | None
    next_url: str | None
    mark: str | None
    refreshed_at: float


_CHECK_COLUMNS: Final = [f.name for f in fields(PageCheck)]


@dataclass(frozen=True, slots=True)
class Committed:
    """What `commit_page` stored: the new events as (id, payload), and how many items were repeats."""

    events: list[tuple[str, bytes]]
    duplicates: int


# -- alert rule states (daemon.store.alerts) -----------------------------------------------------


class AlertState(msgspec.Struct, kw_only=True):
    """One rule's state; persisted as JSON, so every field has a default (older rows still load)."""

    state: Literal["ok", "pending", "firing"] = "ok"
    since: float | None = None
    """When the current state began (pending: the condition first held; firing: it fired)."""
    value: float | None = None
    """The rule's value at the last evaluation (None: no data)."""
    evaluated_at: float | None = None
    notified: list[int] = []
    """Escalation steps told about the current firing."""
    resolving: dict[str, int] = {}
    """Channels still owed a resolved notice -> tries so far."""
    last_firing: float | None = None
    """When the last firing began (kept after it resolves, for the resolved notice)."""
    last_error: str | None = None
    fired: int = 0
    """How many times the rule has fired."""
    # anomaly rules
    mean: float | None = None
    variance: float = 0.0
    first_seen: float | None = None
    z: float | None = None


_decode_alert = msgspec.json.Decoder(AlertState).decode
_encode_alert = msgspec.json.Encoder().encode


def alert_states(rows: Iterable[Sequence[Any]]) -> dict[str, AlertState]:
    """Stored (rule, JSON) rows as states. A row that no longer decodes (a newer ferry's, or
    damaged) is left out with a warning: its rule starts from `ok`, costing at most one repeated
    notification, never the alerter."""
    states = {}
    for rule, text in rows:
        try:
            states[rule] = _decode_alert(text)
        except msgspec.DecodeError as exc:
            logging.getLogger("ferry.alerts").warning(
                "stored alert state unreadable; the rule starts afresh",
                extra={"fields": {"rule": rule, "error": str(exc)}},
            )
    return states


def alert_rows(states: Mapping[str, AlertState], now: float) -> list[tuple[str, str, float]]:
    """`states` as (rule, JSON, updated_at) rows."""
    return [(rule, _encode_alert(state).decode(), now) for rule, state in states.items()]


# -- confirmation (daemon.store.confirmations) ---------------------------------------------------

_ROOT_ID = re.compile(r"^([0-9a-f]{11})[0-9a-f]{16}")


CLOCK_SLACK = 5.0
"""Seconds the lookup starts before the id's time: clock steps may reorder `received_at` slightly."""


MAX_EVENTS = 1000


_STATES = dict(enumerate(STATE_NAMES))  # pending, delivered, dead, stale (daemon.store.ordering)


class DeliveryOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """One delivery of an event (or a transform's dead letter of it) as recorded so far."""

    id: str
    stage: str
    state: str
    attempts: int
    created_at: float
    finished_at: float | None
    next_attempt_at: float | None
    status: int | None
    latency_s: float | None
    """How long the last attempt took."""
    response: str | None
    """The start of the receiver's answer to the last attempt."""
    error: str | None


class EventOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """One stored event with its deliveries."""

    id: str
    stream: str
    received_at: float
    payload: Any
    deliveries: list[DeliveryOutcome]


class WindowWait(msgspec.Struct, frozen=True, kw_only=True):
    """An output of the event waiting in an aggregating transform's open window."""

    id: str
    transform: str
    key: Any
    opened_at: float
    size: int


class EventReport(msgspec.Struct, frozen=True, kw_only=True):
    """`ferry ctl event ID`: the event, everything derived from it, and what is still in windows."""

    events: list[EventOutcome]
    windows: list[WindowWait]
