"""What `ferry ctl` reads from and changes in the store: plain functions of a connection.

Like `daemon.store.outbox`, each runs on the store's writer thread inside a group
transaction, so a retry or a purge is all-or-nothing. Filters select dead
letters (`state = 2`) by stage, by age of their last attempt and by a
case-insensitive substring of their last error.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from daemon.store.at_rest import cipher_of
from daemon.store.outbox import delivery_id
from daemon.store.schema import DEAD, DELIVERED, PENDING, STATE_NAMES
from daemon.store.types import AuditRow, DeadFilter, DeadLetter, _letter, percentile

Connection = sqlite3.Connection


def _where(selection: DeadFilter, now: float) -> tuple[str, list[Any]]:
    clauses, params = [f"d.state = {DEAD}"], list[Any]()
    if selection.ids:
        clauses.append(f"d.id IN ({','.join('?' * len(selection.ids))})")
        params.extend(selection.ids)
    if selection.stages:
        clauses.append(f"d.stage IN ({','.join('?' * len(selection.stages))})")
        params.extend(selection.stages)
    if selection.since is not None:
        clauses.append("d.finished_at >= ?")
        params.append(now - selection.since)
    if selection.error:
        clauses.append("instr(lower(coalesce(d.last_error, '')), lower(?)) > 0")
        params.append(selection.error)
    return " AND ".join(clauses), params


def list_dead(conn: Connection, selection: DeadFilter, limit: int) -> tuple[int, list[DeadLetter]]:
    """How many dead letters match, and the newest `limit` of them with their event ids (without
    payloads: `show_delivery` has the payload)."""
    where, params = _where(selection, time.time())
    (total,) = conn.execute(f"SELECT count(*) FROM deliveries d WHERE {where}", params).fetchone()
    rows = conn.execute(
        "SELECT d.id, d.stage, d.attempts, d.created_at, d.finished_at, d.last_status, d.last_error, e.id "
        f"FROM deliveries d LEFT JOIN events e ON e.seq = d.event_seq WHERE {where} "
        "ORDER BY d.finished_at DESC, d.rowid DESC LIMIT ?",
        [*params, limit],
    ).fetchall()
    return int(total), [_letter(*row) for row in rows]


def show_delivery(conn: Connection, delivery_id: str) -> tuple[str, DeadLetter] | None:
    """One delivery (any state) with its event's payload, and its state name; None if unknown.

    Dead letters (what `dlq show` is for) are found through the `deliveries_dead` index; any
    other state costs a scan of the deliveries table.
    """
    query = (
        "SELECT d.id, d.stage, d.state, d.attempts, d.created_at, d.finished_at, d.last_status, "
        "d.last_error, e.id, CAST(e.payload AS TEXT) FROM deliveries d "
        "LEFT JOIN events e ON e.seq = d.event_seq WHERE d.id = ?"
    )
    row = conn.execute(f"{query} AND d.state = {DEAD}", (delivery_id,)).fetchone()
    if row is None:
        row = conn.execute(query, (delivery_id,)).fetchone()
    if row is None:
        return None
    id_, stage, state, attempts, created, finished, status, error, event_id, payload = row
    if payload is not None and (cipher := cipher_of(conn)) is not None:
        payload = cipher.open(payload.encode()).decode("utf-8", "replace")
    try:
        decoded = msgspec.json.decode(payload) if payload is not None else None
    except msgspec.DecodeError:
        decoded = payload
    letter = _letter(id_, stage, attempts, created, finished, status, error, event_id, decoded)
    return STATE_NAMES[state], letter


def retry_dead(conn: Connection, selection: DeadFilter) -> dict[str, int]:
    """Make matching dead letters pending again, due now, with their attempt count reset.

    They keep their id, so the receiver sees the same idempotency key. Returns
    how many were revived per stage.
    """
    now = time.time()
    where, params = _where(selection, now)
    stages = dict(
        conn.execute(
            f"SELECT d.stage, count(*) FROM deliveries d WHERE {where} GROUP BY d.stage", params
        ).fetchall()
    )
    conn.execute(
        f"UPDATE deliveries SET state = {PENDING}, attempts = 0, next_attempt_at = ?, finished_at = NULL "
        f"WHERE rowid IN (SELECT d.rowid FROM deliveries d WHERE {where})",
        [now, *params],
    )
    return {str(stage): int(count) for stage, count in stages.items()}


def purge_dead(conn: Connection, selection: DeadFilter, *, dry_run: bool = False) -> int:
    """Delete matching dead letters (their events go with the next pruning); return how many."""
    where, params = _where(selection, time.time())
    if dry_run:
        return int(conn.execute(f"SELECT count(*) FROM deliveries d WHERE {where}", params).fetchone()[0])
    return int(
        conn.execute(
            f"DELETE FROM deliveries WHERE rowid IN (SELECT d.rowid FROM deliveries d WHERE {where})", params
        ).rowcount
    )


def due_counts(conn: Connection, stages: Sequence[str], now: float) -> dict[str, int]:
    """Pending deliveries of each of `stages` that are due at `now` (uses the `deliveries_due` index)."""
    result = dict.fromkeys(stages, 0)
    for stage in stages:
        (result[stage],) = conn.execute(
            f"SELECT count(*) FROM deliveries WHERE stage = ? AND state = {PENDING} AND next_attempt_at <= ?",
            (stage, now),
        ).fetchone()
    return result


def transform_backlog(conn: Connection, inputs: dict[str, Sequence[str]]) -> dict[str, int]:
    """Events each transform has not handled yet (`inputs` maps a transform to the streams it reads)."""
    positions = dict(conn.execute("SELECT name, position FROM cursors").fetchall())
    result: dict[str, int] = {}
    for name, streams in inputs.items():
        marks = ",".join("?" * len(streams))
        (result[name],) = conn.execute(
            f"SELECT count(*) FROM events WHERE stream IN ({marks}) AND seq > ?",
            (*streams, positions.get(name, 0)),
        ).fetchone()
    return result


LATENCY_SAMPLE = 10_000


def delivery_latencies(conn: Connection, stage: str, limit: int = LATENCY_SAMPLE) -> list[float]:
    """Seconds from creation to delivery of the last `limit` deliveries of `stage` still stored.

    Walks the `deliveries_done` index from the newest, so the cost is bounded by `limit`.
    """
    rows = conn.execute(
        f"SELECT finished_at - created_at FROM deliveries WHERE state = {DELIVERED} AND stage = ? "
        "ORDER BY finished_at DESC LIMIT ?",
        (stage, limit),
    ).fetchall()
    return [float(row[0]) for row in rows]


# The error type of a failed attempt: its HTTP status, else what the transport or jq said
# (the messages come from daemon.http.client and actors.transform.transformer).
_ERROR_TYPE = """CASE
    WHEN last_status IS NOT NULL THEN 'http_' || last_status
    WHEN last_error LIKE '%timed out%' THEN 'timeout'
    WHEN last_error LIKE '%connection refused%' THEN 'connection_refused'
    WHEN last_error LIKE '%connection reset%' THEN 'connection_closed'
    WHEN last_error LIKE '%connection closed%' THEN 'connection_closed'
    WHEN last_error LIKE '%cannot resolve%' THEN 'dns'
    WHEN last_error LIKE '%TLS%' THEN 'tls'
    WHEN last_error LIKE 'jq:%' THEN 'jq'
    ELSE 'other' END"""


def error_counts(conn: Connection) -> list[tuple[str, str, int | None, int, str]]:
    """(stage, state, last status, count, error type) of deliveries that failed and are not delivered."""
    names = {PENDING: "retrying", DEAD: "dead"}
    rows = conn.execute(
        f"SELECT stage, state, last_status, count(*), {_ERROR_TYPE} AS kind FROM deliveries "
        f"WHERE state IN ({PENDING}, {DEAD}) AND last_error IS NOT NULL "
        "GROUP BY stage, state, kind ORDER BY stage, state, kind"
    ).fetchall()
    return [(stage, names[state], status, count, kind) for stage, state, status, count, kind in rows]


def record_audit(
    conn: Connection, *, uid: int | None, pid: int | None, command: str, arguments: str, outcome: str
) -> None:
    conn.execute(
        "INSERT INTO audit(at, uid, pid, command, arguments, outcome) VALUES (?, ?, ?, ?, ?, ?)",
        (time.time(), uid, pid, command, arguments, outcome),
    )


def read_audit(conn: Connection, limit: int) -> list[AuditRow]:
    """The newest `limit` audit rows, oldest first."""
    rows = conn.execute(
        "SELECT at, uid, pid, command, arguments, outcome FROM audit ORDER BY rowid DESC LIMIT ?", (limit,)
    ).fetchall()
    return [
        AuditRow(at=at, uid=uid, pid=pid, command=command, arguments=arguments, outcome=outcome)
        for at, uid, pid, command, arguments, outcome in reversed(rows)
    ]


def prune_audit(conn: Connection, *, retention: float, limit: int = 20_000) -> int:
    """Delete audit rows older than `retention` seconds (at most `limit`); the count removed.

    Rows are appended in time order, so the old ones are a prefix in rowid order: the cut is
    the first row young enough to keep, found by a rowid-ordered scan over the old rows only
    (no index on `at`). A clock stepped back only delays pruning; no row younger than
    `retention` is ever deleted.
    """
    first_kept = conn.execute(
        "SELECT rowid FROM audit WHERE at >= ? ORDER BY rowid LIMIT 1", (time.time() - retention,)
    ).fetchone()
    bound = first_kept[0] if first_kept is not None else 2**62
    return conn.execute(
        "DELETE FROM audit WHERE rowid IN (SELECT rowid FROM audit WHERE rowid < ? ORDER BY rowid LIMIT ?)",
        (bound, limit),
    ).rowcount


# -- replay ----------------------------------------------------------------------------------


def start_replay(
    conn: Connection, *, source: str, since: float | None, until: float | None, sinks: Sequence[str]
) -> int:
    """Record a replay and return its number (`n`, never reused), which goes into its delivery ids."""
    cursor = conn.execute(
        "INSERT INTO replays(at, source, since, until, sinks) VALUES (?, ?, ?, ?, ?)",
        (time.time(), source, since, until, msgspec.json.encode(list(sinks)).decode()),
    )
    return int(cursor.lastrowid or 0)


def replay_selection(
    conn: Connection, *, source: str, since: float | None, until: float | None, streams: Sequence[str]
) -> list[tuple[int, str]]:
    """(seq, stream) of the stored events to replay, in seq order.

    The events of `source` received in [`since`, `until`), and the events of the other
    `streams` (transforms) derived from them: a derived id starts with its root's id and
    a dot (`ROOT.shape`, `ROOT.shape.enrich.1`), and is stored after its root.
    """
    clauses, params = ["stream = ?"], list[Any]([source])
    if since is not None:
        clauses.append("received_at >= ?")
        params.append(since)
    if until is not None:
        clauses.append("received_at < ?")
        params.append(until)
    roots = conn.execute(
        f"SELECT seq, id FROM events WHERE {' AND '.join(clauses)} ORDER BY seq", params
    ).fetchall()
    selected: list[tuple[int, str]] = [(seq, source) for seq, _ in roots] if source in streams else []
    if not roots:
        return selected
    ids = {id_ for _, id_ in roots}
    low, high = min(ids), max(ids) + "/"  # "/" sorts right after "."
    for stream in streams:
        if stream == source:
            continue
        for seq, id_ in conn.execute(
            "SELECT seq, id FROM events WHERE stream = ? AND seq > ? AND id > ? AND id < ?",
            (stream, roots[0][0], low, high),
        ).fetchall():
            if id_.split(".", 1)[0] in ids:
                selected.append((seq, stream))
    selected.sort()
    return selected


def insert_replay(
    conn: Connection, *, number: int, seqs_by_sink: Mapping[str, Sequence[int]]
) -> dict[str, int]:
    """New pending deliveries `EVENT_ID.SINK.rNUMBER` of the given events, due now; count per sink.

    Events pruned since they were selected are skipped (a delivery needs its event).
    """
    now = time.time()
    created: dict[str, int] = {}
    for sink, seqs in seqs_by_sink.items():
        created[sink] = 0
        for start in range(0, len(seqs), 500):
            chunk = seqs[start : start + 500]
            created[sink] += conn.execute(
                "INSERT INTO deliveries(id, event_seq, stage, created_at, next_attempt_at) "
                f"SELECT id || ?, seq, ?, ?, ? FROM events WHERE seq IN ({','.join('?' * len(chunk))})",
                (delivery_id("", sink) + f".r{number}", sink, now, now, *chunk),
            ).rowcount
    return created


def pending_by_stage(conn: Connection, stages: Iterable[str]) -> dict[str, int]:
    """Pending deliveries per stage (0 for a stage with none); reads the `deliveries_due` index."""
    depths = dict.fromkeys(stages, 0)
    for stage, count in conn.execute(
        f"SELECT stage, count(*) FROM deliveries WHERE state = {PENDING} GROUP BY stage"
    ).fetchall():
        if stage in depths:
            depths[stage] = int(count)
    return depths


__all__ = [
    "LATENCY_SAMPLE",
    "AuditRow",
    "DeadFilter",
    "DeadLetter",
    "delivery_latencies",
    "due_counts",
    "error_counts",
    "insert_replay",
    "list_dead",
    "pending_by_stage",
    "percentile",
    "prune_audit",
    "purge_dead",
    "read_audit",
    "record_audit",
    "replay_selection",
    "retry_dead",
    "show_delivery",
    "start_replay",
    "transform_backlog",
]
