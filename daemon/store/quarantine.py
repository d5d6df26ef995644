"""Crash quarantine: a restart never loops on data.

`daemon.poison` isolates what a stage can catch. What it cannot — a crash in code outside
that net, the process killed (segfault, OOM kill, kill -9, `TooManyRestarts` and systemd's
restart) — must still not bring the stage back to the same event for ever. So each stage
records, durably and before working on it, the event at its head:

Rule (`stage_heads`, one row per stage):
    1. Each incarnation of a stage (a start of its actor, in this process or a new one) commits
       `(head, until, attempts)` before its first batch: `head` is the seq of the first event
       after its cursor, `until` the last seq of that batch; `attempts` is 1 for a new head and
       one more when the head is the same as the row's (the cursor did not move past it).
    2. A start that finds the cursor still before the recorded head (the last incarnation did not
       get past it) works *carefully* up to `until`: one event per batch, recording each event
       as the head before working on it, so a crash points at exactly one event.
    3. When the head would be attempted for more than `quarantine_after` times, that event is
       not run again: it is dead-lettered with the reason `poison: quarantined …` (it shows in
       `ferry ctl dlq list` and `dlq retry` runs it through the stage again) and the rest flows.

Cost:
    One small commit per incarnation start, plus one per event only in careful mode (at most one
    batch of events after a crash). The steady state pays nothing.
"""

from __future__ import annotations

import sqlite3
import time

from daemon.store.outbox import Due, due_deliveries
from daemon.store.schema import DEAD
from daemon.store.types import Head, careful_until, quarantine_reason

Connection = sqlite3.Connection


def read_head(conn: Connection, stage: str) -> Head | None:
    """The recorded head of `stage`, or None."""
    row = conn.execute("SELECT head, until, attempts FROM stage_heads WHERE stage = ?", (stage,)).fetchone()
    return Head(int(row[0]), int(row[1]), int(row[2])) if row else None


def attempt_head(conn: Connection, stage: str, head: int, until: int) -> Head:
    """Record that `stage` is about to work on the events `head`..`until`; return the new record.

    The same head as recorded counts one more attempt (and keeps the larger `until`).
    """
    old = read_head(conn, stage)
    if old is not None and old.head == head:
        new = Head(head, max(until, old.until), old.attempts + 1)
    else:
        new = Head(head, until, 1)
    conn.execute(
        "INSERT OR REPLACE INTO stage_heads(stage, head, until, attempts) VALUES (?, ?, ?, ?)",
        (stage, *new),
    )
    return new


def check_head(conn: Connection, stage: str, quarantine_after: int) -> tuple[Due, int] | None:
    """Record the head delivery of `stage`; quarantine it (and return it with its count) when
    it was the head of more than `quarantine_after` incarnations (its attempts count those)."""
    rows = due_deliveries(conn, stage, time.time(), 1)
    if not rows:
        return None
    (due,) = rows
    head = attempt_head(conn, stage, due.rowid, due.rowid)
    if head.attempts <= quarantine_after:
        return None
    crashes = head.attempts - 1
    conn.execute(
        f"UPDATE deliveries SET state = {DEAD}, attempts = attempts + ?, finished_at = ?, last_error = ? "
        "WHERE rowid = ?",
        (crashes, time.time(), quarantine_reason(f"sink {stage}", crashes), due.rowid),
    )
    return due, crashes


__all__ = ["Head", "attempt_head", "careful_until", "check_head", "quarantine_reason", "read_head"]
