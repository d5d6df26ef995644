"""What `ferry ctl` reads and changes, on PostgreSQL: functions of a `Db`, as `daemon.store.ops`.

Each runs in one transaction of the group commit, so a retry or a purge is all-or-nothing. The
audit trail, dead letters and replays live in the shared database: every node's `ferry ctl` sees
and changes the same rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from daemon.store.postgres.connect import Db
from daemon.store.types import (
    DEAD,
    DELIVERED,
    PENDING,
    STATE_NAMES,
    AuditRow,
    DeadFilter,
    DeadLetter,
    _letter,
    delivery_id,
)

_ERROR_TYPE = """CASE
    WHEN last_status IS NOT NULL THEN 'http_' || last_status
    WHEN last_error LIKE '%%timed out%%' THEN 'timeout'
    WHEN last_error LIKE '%%connection refused%%' THEN 'connection_refused'
    WHEN last_error LIKE '%%connection reset%%' THEN 'connection_closed'
    WHEN last_error LIKE '%%connection closed%%' THEN 'connection_closed'
    WHEN last_error LIKE '%%cannot resolve%%' THEN 'dns'
    WHEN last_error LIKE '%%TLS%%' THEN 'tls'
    WHEN last_error LIKE 'jq:%%' THEN 'jq'
    ELSE 'other' END"""
"""`daemon.store.ops._ERROR_TYPE` with `%` doubled for psycopg's placeholders."""


def _where(selection: DeadFilter, now: float) -> tuple[str, list[Any]]:
    clauses, params = [f"d.state = {DEAD}"], list[Any]()
    if selection.ids:
        clauses.append("d.id = ANY(%s)")
        params.append(list(selection.ids))
    if selection.stages:
        clauses.append("d.stage = ANY(%s)")
        params.append(list(selection.stages))
    if selection.since is not None:
        clauses.append("d.finished_at >= %s")
        params.append(now - selection.since)
    if selection.error:
        clauses.append("strpos(lower(coalesce(d.last_error, '')), lower(%s)) > 0")
        params.append(selection.error)
    return " AND ".join(clauses), params


def list_dead(db: Db, selection: DeadFilter, limit: int) -> tuple[int, list[DeadLetter]]:
    where, params = _where(selection, time.time())
    row = db.execute(f"SELECT count(*) FROM deliveries d WHERE {where}", params).fetchone()
    rows = db.execute(
        "SELECT d.id, d.stage, d.attempts, d.created_at, d.finished_at, d.last_status, d.last_error, e.id "
        f"FROM deliveries d LEFT JOIN events e ON e.seq = d.event_seq WHERE {where} "
        "ORDER BY d.finished_at DESC, d.rowid DESC LIMIT %s",
        [*params, limit],
    ).fetchall()
    return int(row[0]) if row else 0, [_letter(*r) for r in rows]


def show_delivery(db: Db, delivery_id: str) -> tuple[str, DeadLetter] | None:
    row = db.execute(
        "SELECT d.id, d.stage, d.state, d.attempts, d.created_at, d.finished_at, d.last_status, "
        "d.last_error, e.id, e.payload FROM deliveries d LEFT JOIN events e ON e.seq = d.event_seq "
        "WHERE d.id = %s ORDER BY d.state = 2 DESC LIMIT 1",
        (delivery_id,),
    ).fetchone()
    if row is None:
        return None
    id_, stage, state, attempts, created, finished, status, error, event_id, payload = row
    decoded: Any = None
    if payload is not None:
        raw = payload if db.cipher is None else db.cipher.open(payload)
        try:
            decoded = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            decoded = raw.decode("utf-8", "replace")
    letter = _letter(id_, stage, attempts, created, finished, status, error, event_id, decoded)
    return STATE_NAMES[state], letter


def retry_dead(db: Db, selection: DeadFilter) -> dict[str, int]:
    now = time.time()
    where, params = _where(selection, now)
    rows = db.execute(
        f"UPDATE deliveries SET state = {PENDING}, attempts = 0, next_attempt_at = %s, finished_at = NULL, "
        "lease_owner = NULL, lease_until = NULL WHERE rowid IN (SELECT d.rowid FROM "
        f"deliveries d WHERE {where}) "
        "RETURNING stage",
        [now, *params],
    ).fetchall()
    result: dict[str, int] = {}
    for (stage,) in rows:
        result[stage] = result.get(stage, 0) + 1
    return result


def purge_dead(db: Db, selection: DeadFilter, *, dry_run: bool = False) -> int:
    where, params = _where(selection, time.time())
    if dry_run:
        row = db.execute(f"SELECT count(*) FROM deliveries d WHERE {where}", params).fetchone()
        return int(row[0]) if row else 0
    return db.count(
        f"DELETE FROM deliveries WHERE rowid IN (SELECT d.rowid FROM deliveries d WHERE {where})", params
    )


def due_counts(db: Db, stages: Sequence[str], now: float) -> dict[str, int]:
    result = dict.fromkeys(stages, 0)
    for stage, count in db.execute(
        f"SELECT stage, count(*) FROM deliveries WHERE stage = ANY(%s) AND state = {PENDING} "
        "AND next_attempt_at <= %s GROUP BY stage",
        (list(stages), now),
    ).fetchall():
        result[stage] = int(count)
    return result


def transform_backlog(db: Db, inputs: Mapping[str, Sequence[str]]) -> dict[str, int]:
    positions = dict(db.execute("SELECT name, position FROM cursors").fetchall())
    result: dict[str, int] = {}
    for name, streams in inputs.items():
        row = db.execute(
            "SELECT count(*) FROM events WHERE stream = ANY(%s) AND seq > %s",
            (list(streams), positions.get(name, 0)),
        ).fetchone()
        result[name] = int(row[0]) if row else 0
    return result


def delivery_latencies(db: Db, stage: str, limit: int = 10_000) -> list[float]:
    rows = db.execute(
        f"SELECT finished_at - created_at FROM deliveries WHERE state = {DELIVERED} AND stage = %s "
        "ORDER BY finished_at DESC LIMIT %s",
        (stage, limit),
    ).fetchall()
    return [float(row[0]) for row in rows]


def error_counts(db: Db) -> list[tuple[str, str, int | None, int, str]]:
    names = {PENDING: "retrying", DEAD: "dead"}
    rows = db.execute(
        f"SELECT stage, state, max(last_status), count(*), {_ERROR_TYPE} AS kind FROM deliveries "
        f"WHERE state IN ({PENDING}, {DEAD}) AND last_error IS NOT NULL "
        "GROUP BY stage, state, kind ORDER BY stage, state, kind"
    ).fetchall()
    return [(stage, names[state], status, int(count), kind) for stage, state, status, count, kind in rows]


def record_audit(
    db: Db, *, uid: int | None, pid: int | None, command: str, arguments: str, outcome: str
) -> None:
    db.execute(
        "INSERT INTO audit(at, uid, pid, command, arguments, outcome) VALUES (%s, %s, %s, %s, %s, %s)",
        (time.time(), uid, pid, command, arguments, outcome),
    )


def read_audit(db: Db, limit: int) -> list[AuditRow]:
    rows = db.execute(
        "SELECT at, uid, pid, command, arguments, outcome FROM audit ORDER BY rowid DESC LIMIT %s", (limit,)
    ).fetchall()
    return [
        AuditRow(at=at, uid=uid, pid=pid, command=command, arguments=arguments, outcome=outcome)
        for at, uid, pid, command, arguments, outcome in reversed(rows)
    ]


def prune_audit(db: Db, *, retention: float, limit: int = 20_000) -> int:
    return db.count(
        "DELETE FROM audit WHERE rowid IN (SELECT rowid FROM audit WHERE at < %s ORDER BY rowid LIMIT %s)",
        (time.time() - retention, limit),
    )


def start_replay(
    db: Db, *, source: str, since: float | None, until: float | None, sinks: Sequence[str]
) -> int:
    row = db.execute(
        "INSERT INTO replays(at, source, since, until, sinks) VALUES (%s, %s, %s, %s, %s) RETURNING n",
        (time.time(), source, since, until, msgspec.json.encode(list(sinks)).decode()),
    ).fetchone()
    return int(row[0]) if row else 0


def replay_selection(
    db: Db, *, source: str, since: float | None, until: float | None, streams: Sequence[str]
) -> list[tuple[int, str]]:
    """`daemon.store.ops.replay_selection` on PostgreSQL (ids compared byte-wise: `COLLATE "C"`)."""
    clauses, params = ["stream = %s"], list[Any]([source])
    if since is not None:
        clauses.append("received_at >= %s")
        params.append(since)
    if until is not None:
        clauses.append("received_at < %s")
        params.append(until)
    roots = db.execute(
        f"SELECT seq, id FROM events WHERE {' AND '.join(clauses)} ORDER BY seq", params
    ).fetchall()
    selected: list[tuple[int, str]] = [(seq, source) for seq, _ in roots] if source in streams else []
    if not roots:
        return selected
    ids = {id_ for _, id_ in roots}
    low, high = min(ids), max(ids) + "/"
    for stream in streams:
        if stream == source:
            continue
        for seq, id_ in db.execute(
            'SELECT seq, id FROM events WHERE stream = %s AND seq > %s AND id COLLATE "C" > %s '
            'AND id COLLATE "C" < %s',
            (stream, roots[0][0], low, high),
        ).fetchall():
            if id_.split(".", 1)[0] in ids:
                selected.append((seq, stream))
    selected.sort()
    return selected


def insert_replay(db: Db, *, number: int, seqs_by_sink: Mapping[str, Sequence[int]]) -> dict[str, int]:
    now = time.time()
    created: dict[str, int] = {}
    for sink, seqs in seqs_by_sink.items():
        created[sink] = db.count(
            "INSERT INTO deliveries(id, event_seq, stage, created_at, next_attempt_at) "
            "SELECT id || %s, seq, %s, %s, %s FROM events WHERE seq = ANY(%s) ORDER BY seq",
            (delivery_id("", sink) + f".r{number}", sink, now, now, list(seqs)),
        )
    return created


def pending_by_stage(db: Db, stages: Iterable[str]) -> dict[str, int]:
    depths = dict.fromkeys(stages, 0)
    for stage, count in db.execute(
        f"SELECT stage, count(*) FROM deliveries WHERE state = {PENDING} GROUP BY stage"
    ).fetchall():
        if stage in depths:
            depths[stage] = int(count)
    return depths
