"""Tumbling windows of an aggregating transform: which window each output joins, and the store rows.

Model:
    Per group key at most one window is open. An output joins its key's open window, or opens a
    new one. A window closes when it holds `max_events`, or `max_age` after it opened (on trio's
    clock, so tests drive it with `MockClock`), whichever comes first; the next output of that
    key opens a new window. A closed window is emitted once: the `reduce` of its events, as one
    event whose id is the id of the window's first event (`PARENT.TRANSFORM[.N]`, the id that
    output would have had), so a re-emission after a crash carries the same idempotency keys.

Durability (the two commits):
    1. A batch of input events: the outputs join their windows (`window_events`, `windows`) in
       the transaction that also moves the transform's cursor past the batch.
    2. A closed window: its emitted event, the event's deliveries and the removal of the window
       and its events commit in one transaction.
    A crash between the two leaves a closed window in the store; the actor emits it when it
    starts (`Windows.restore` finds it full or past its age). So a restart — even `kill -9` —
    loses no event and emits no window twice.

Payloads in `window_events` are sealed like event payloads (`[store] encryption`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from daemon.store.at_rest import opened, seal
from daemon.store.outbox import (
    Connection,
    NewDeadLetter,
    NewEvent,
    StoredEvent,
    commit_transform,
    insert_rows,
    last_seq,
    store_events,
)
from daemon.store.windowing import Emitted, Joined, Window, Windows

# -- store functions (run on the writer thread, inside its transaction) -----------------------


def stored_windows(conn: Connection, transform: str) -> list[tuple[int, str, float, int]]:
    """The transform's windows (id, key, opened_at, size), oldest first."""
    rows = conn.execute(
        "SELECT id, key, opened_at, size FROM windows WHERE transform = ? ORDER BY id", (transform,)
    ).fetchall()
    return [(int(i), str(k), float(o), int(s)) for i, k, o, s in rows]


def commit_joined(
    conn: Connection,
    transform: str,
    position: int,
    joined: Sequence[Joined],
    windows: Sequence[Window],
    failures: Sequence[tuple[StoredEvent, str]],
) -> None:
    """Commit 1: the batch's outputs into their windows, the windows' new sizes, dead letters, cursor."""
    commit_transform(conn, transform, position, outputs=(), failures=failures, sinks=())
    insert_rows(
        conn,
        "INSERT INTO window_events(transform, window, n, id, payload, trace) VALUES ",
        [(transform, j.window, j.n, j.id, seal(conn, j.payload), j.trace) for j in joined],
    )
    conn.executemany(
        "INSERT INTO windows(transform, id, key, opened_at, size) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT(transform, id) DO UPDATE SET size = excluded.size",
        [(transform, w.id, w.key, w.opened_at, w.size) for w in windows],
    )


def window_contents(
    conn: Connection, transform: str, window_ids: Sequence[int]
) -> dict[int, list[tuple[str, bytes, str | None]]]:
    """Each window's events (id, payload, trace), in the order they joined."""
    contents: dict[int, list[tuple[str, bytes, str | None]]] = {window: [] for window in window_ids}
    for window in window_ids:
        for id_, payload, trace in conn.execute(
            "SELECT id, payload, trace FROM window_events WHERE transform = ? AND window = ? ORDER BY n",
            (transform, window),
        ).fetchall():
            contents[window].append((id_, opened(conn, bytes(payload)), trace))
    return contents


def commit_emitted(conn: Connection, transform: str, emitted: Sequence[Emitted]) -> int:
    """Commit 2: each window's event and deliveries (or dead letter), and the window's removal.

    A window whose `reduce` failed is kept as an event of stream `TRANSFORM/windows` (no
    component reads it; its payload is the window's events as an array) with a dead delivery of
    stage `TRANSFORM`, so `ferry ctl dlq show` shows the error and what the window held.
    Returns how many events were stored for downstream.
    """
    events: list[NewEvent] = []
    failed: list[tuple[int, str, str]] = []  # (index in events, id, error)
    stored = 0
    for item in emitted:
        if item.error is not None:
            failed.append((len(events), item.id, item.error))
            events.append((item.id, f"{transform}/windows", item.contents, item.trace, ()))
        elif item.payload is not None:
            stored += 1
            events.append((item.id, transform, item.payload, item.trace, item.sinks))
    # The failed windows' dead letters refer to their events' seqs: `store_events` numbers in order.
    first = last_seq(conn) + 1
    dead = [NewDeadLetter(id_, first + index, transform, error) for index, id_, error in failed]
    store_events(conn, events, time.time(), dead)
    ids = [(transform, item.window) for item in emitted]
    conn.executemany("DELETE FROM window_events WHERE transform = ? AND window = ?", ids)
    conn.executemany("DELETE FROM windows WHERE transform = ? AND id = ?", ids)
    return stored


__all__ = [
    "Emitted",
    "Joined",
    "Window",
    "Windows",
    "commit_emitted",
    "commit_joined",
    "stored_windows",
    "window_contents",
]
