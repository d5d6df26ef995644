"""The SQLite backend's store functions (`daemon.store.functions.Functions`): which function of
which area module serves each domain operation. `daemon.store.operations.Operations` runs them on
the writer thread, inside the group commit (`daemon.store.sqlite.Store`).

The table holds the functions themselves: a test that makes one fail patches the table
(`monkeypatch.setattr(SqliteFunctions, "commit_pages", staticmethod(fn))`), not the area module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, TypeVar, final

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
from daemon.store.api import Attempt
from daemon.store.functions import Functions
from daemon.store.ordering import Ordering
from daemon.store.outbox import Connection

T = TypeVar("T")


def _record_all(conn: Connection, attempts: Sequence[Attempt], ordering: Ordering | None) -> None:
    record = outbox.record_outcomes if ordering is None else ordering_sql.record
    for outcomes, latency, response in attempts:
        record(conn, outcomes, latency, response)


def _unguarded(fn: Callable[[Connection], T]) -> Callable[[Connection], T]:
    """One node, no leases: a singleton's commit needs no fencing check."""
    return fn


@final
class SqliteFunctions:
    """`Functions` on a SQLite connection."""

    guarded = staticmethod(_unguarded)
    insert_events = staticmethod(outbox.insert_events)
    cursor = staticmethod(outbox.cursor)
    read_events = staticmethod(outbox.read_events)
    commit_transform = staticmethod(outbox.commit_transform)
    revived = staticmethod(transform_retry.revived)
    commit_revived = staticmethod(transform_retry.commit_revived)
    read_head = staticmethod(quarantine.read_head)
    attempt_head = staticmethod(quarantine.attempt_head)
    stored_windows = staticmethod(window_sql.stored_windows)
    commit_joined = staticmethod(window_sql.commit_joined)
    window_contents = staticmethod(window_sql.window_contents)
    commit_emitted = staticmethod(window_sql.commit_emitted)
    due_deliveries = staticmethod(outbox.due_deliveries)
    due_ordered = staticmethod(ordering_sql.due)
    next_due_after = staticmethod(outbox.next_due_after)
    unpark = staticmethod(outbox.unpark)
    record_outcomes = staticmethod(_record_all)
    renew_claims = staticmethod(outbox.renew_claims)
    quarantine_head = staticmethod(quarantine.check_head)
    load_poll_state = staticmethod(poll.load_state)
    save_poll_state = staticmethod(poll.save_state)
    load_page_checks = staticmethod(poll.load_checks)
    commit_pages = staticmethod(poll.commit_pages)
    list_dead = staticmethod(ops.list_dead)
    show_delivery = staticmethod(ops.show_delivery)
    retry_dead = staticmethod(ops.retry_dead)
    purge_dead = staticmethod(ops.purge_dead)
    record_audit = staticmethod(ops.record_audit)
    read_audit = staticmethod(ops.read_audit)
    event_outcomes = staticmethod(confirmations.event_outcomes)
    counts = staticmethod(outbox.counts)
    pending_total = staticmethod(outbox.pending_total)
    due_counts = staticmethod(ops.due_counts)
    transform_backlog = staticmethod(ops.transform_backlog)
    error_counts = staticmethod(ops.error_counts)
    delivery_latencies = staticmethod(ops.delivery_latencies)
    replay_selection = staticmethod(ops.replay_selection)
    start_replay = staticmethod(ops.start_replay)
    insert_replay = staticmethod(ops.insert_replay)
    load_alert_states = staticmethod(alerts.load_states)
    save_alert_states = staticmethod(alerts.save_states)
    load_refresh_token = staticmethod(tokens.load_refresh_token)
    save_refresh_token = staticmethod(tokens.save_refresh_token)
    prune = staticmethod(outbox.prune)
    prune_audit = staticmethod(ops.prune_audit)
    pending_by_stage = staticmethod(ops.pending_by_stage)


FUNCTIONS: Final[Functions[Connection]] = SqliteFunctions()
"""The table `Store` runs on (mypy checks here that it is the whole of `Functions`)."""

__all__ = ["FUNCTIONS", "SqliteFunctions"]
