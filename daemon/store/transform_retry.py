"""Retried dead letters of a transform: what `ferry ctl dlq retry` hands back to the stage.

A transform's dead letter is a `deliveries` row of the transform's own stage pointing at the
event it could not transform. `dlq retry` makes it pending again; the transformer reads such
rows here (`revived`) and commits each one's outcome (`commit_revived`): its outputs and their
deliveries, the row then delivered; or the row dead again with the new reason, one attempt more.
Like `daemon.store.outbox`, these run on the store's writer thread inside a group transaction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgspec

from daemon.poison import clean
from daemon.store.at_rest import cipher_of
from daemon.store.outbox import Connection, Derived, StoredEvent, commit_transform, cursor
from daemon.store.schema import DEAD, DELIVERED, PENDING
from daemon.store.types import Revived

_rows = msgspec.json.Decoder(list[tuple[int, int, int, str, str, str, str | None]]).decode


def revived(conn: Connection, stage: str, limit: int) -> list[Revived]:
    """Pending rows of transform `stage` (dead letters an operator retried), oldest first."""
    (text,) = conn.execute(
        "SELECT json_group_array(json_array(d.rowid, d.attempts, e.seq, e.id, e.stream, "
        "CAST(e.payload AS TEXT), e.trace)) FROM (SELECT rowid, attempts, event_seq FROM deliveries "
        f"WHERE stage = ? AND state = {PENDING} ORDER BY next_attempt_at, rowid LIMIT ?) d "
        "JOIN events e ON e.seq = d.event_seq",
        (stage, limit),
    ).fetchone()
    cipher = cipher_of(conn)
    return [
        Revived(
            rowid,
            attempts,
            StoredEvent(
                seq, id_, stream, cipher.open(payload.encode()) if cipher else payload.encode(), trace
            ),
        )
        for rowid, attempts, seq, id_, stream, payload, trace in _rows(text)
    ]


def commit_revived(
    conn: Connection,
    name: str,
    row: Revived,
    outputs: Sequence[Derived],
    error: str | None,
    sinks: Sequence[str],
) -> None:
    """Store a retried event's outputs and mark its row delivered, or dead again with `error`."""
    if error is None:
        commit_transform(conn, name, cursor(conn, name), outputs, [], sinks)
    now = time.time()
    conn.execute(
        "UPDATE deliveries SET state = ?, attempts = attempts + 1, finished_at = ?, last_error = ? "
        "WHERE rowid = ?",
        (DELIVERED if error is None else DEAD, now, None if error is None else clean(error), row.rowid),
    )


__all__ = ["Revived", "commit_revived", "revived"]
