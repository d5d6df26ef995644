"""Per-key ordering and conflict resolution for a sink (`[sinks.NAME] ordering = {…}`).

Guarantees, per sink and record key:
    Versions delivered never go down. Deliveries of one key leave one at a time, lowest
    version first (equal versions: creation order); the next waits until the one before has
    an outcome. A delivery once handed to the sender stays its key's head until it is
    delivered or dead, even when a lower version arrives meanwhile and across a restart (a
    request cut off or failed may still have been applied; that lower version then turns
    stale). A key whose head is retrying holds back
    only its own later deliveries; other keys keep flowing.

Staleness:
    `key_versions` keeps the highest version delivered per key. A pending delivery whose
    version is *lower* (an out-of-order or replayed webhook) is never sent: it ends in state
    `stale` with the reason, counted in `ferry ctl stats` and in `ferry.deliveries{outcome=stale}`.
    An equal version is delivered again (a replay of the same data overwrites nothing newer).
    With `coalesce`, a head not yet handed out is also dropped as stale when a newer version of
    its key is pending (superseded): only the newest pending version is sent.

Bad input:
    A delivery whose key or version cannot be read (jq error, null key, a version that does
    not parse under `compare`) is dead-lettered at once with the reason; it never blocks its key.

How:
    Key and version are computed once, when the sink first fetches a delivery, and stored in
    the delivery's `order_key`/`order_version` columns. The sink's fetch (`Ordering.due`) returns
    only each key's head: a due pending row with no earlier pending row of its key
    (`deliveries_by_key`, a partial index holding only ordered rows). Everything runs in
    the store's writer thread, inside one transaction per fetch.
"""

from __future__ import annotations

import sqlite3
import time

import msgspec

from daemon.store.at_rest import cipher_of
from daemon.store.keying import (
    PARSERS,
    Fetched,
    Ordering,
    OrderingError,
    Version,
    number_version,
    rfc3339_version,
    string_version,
)
from daemon.store.outbox import Due, Outcomes, record_outcomes
from daemon.store.schema import DEAD, STALE

Connection = sqlite3.Connection
_rows = msgspec.json.Decoder(list[tuple[int, str, int, float, str, str | None, str, bool]]).decode
MAX_PASSES = 4
"""Keying and stale-marking rounds in one fetch; the fetcher comes back at once if more is left."""


def due(conn: Connection, ordering: Ordering, stage: str, now: float, limit: int) -> Fetched:
    """Each key's next delivery among the due rows of `stage` (see the module docstring).

    Keys rows seen for the first time, dead-letters those that cannot be keyed and marks
    stale those older than their key's delivered version, re-reading until the window is
    settled. After `MAX_PASSES` rounds it returns nothing and `more`: the sink comes back at
    once, and only rows checked in the round that returns them are ever sent.
    """
    stale: list[str] = []
    dead: list[tuple[str, str]] = []
    for _ in range(MAX_PASSES):
        rows = _candidates(conn, stage, now, limit)
        fresh = [due for due, unkeyed in rows if unkeyed]
        if fresh:
            dead += _key_rows(conn, ordering, fresh)
            continue
        heads = [due for due, _ in rows]
        marked = _mark_stale(conn, stage, [due.rowid for due in heads])
        if ordering.config.coalesce:
            marked += _mark_superseded(conn, stage, [due.rowid for due in heads])
        if marked:
            stale += marked
            continue
        return Fetched(_claim(conn, heads), False, stale, dead)
    return Fetched([], True, stale, dead)  # not settled yet: nothing unchecked goes out


def _key_rows(conn: Connection, ordering: Ordering, rows: list[Due]) -> list[tuple[str, str]]:
    """Store key and version of first-seen rows; dead-letter those without: (id, reason) each."""
    results = ordering.identify_all([due.payload for due in rows])
    keyed: list[tuple[str, Version, int]] = []
    failed: list[tuple[Due, str]] = []
    for due, result in zip(rows, results, strict=True):
        if isinstance(result, OrderingError):
            failed.append((due, str(result)))
        else:
            keyed.append((result[0], result[1], due.rowid))
    conn.executemany("UPDATE deliveries SET order_key = ?, order_version = ? WHERE rowid = ?", keyed)
    now = time.time()
    conn.executemany(
        f"UPDATE deliveries SET state = {DEAD}, finished_at = ?, last_error = ? WHERE rowid = ?",
        [(now, reason, due.rowid) for due, reason in failed],
    )
    return [(due.id, reason) for due, reason in failed]


def record(
    conn: Connection, outcomes: Outcomes, latency: float | None = None, response: str | None = None
) -> None:
    """`record_outcomes`, and raise each delivered key's version in `key_versions`."""
    record_outcomes(conn, outcomes, latency, response)
    rowids = [rowid for rowid, _ in outcomes.delivered]
    for start in range(0, len(rowids), 500):
        chunk = rowids[start : start + 500]
        conn.execute(
            "INSERT INTO key_versions(stage, key, version, delivered_at) "
            "SELECT stage, order_key, order_version, ? FROM deliveries "
            f"WHERE rowid IN ({','.join('?' * len(chunk))}) AND order_key IS NOT NULL "
            "ON CONFLICT(stage, key) DO UPDATE SET version = excluded.version, "
            "delivered_at = excluded.delivered_at WHERE excluded.version > key_versions.version",
            [time.time(), *chunk],
        )


def _candidates(conn: Connection, stage: str, now: float, limit: int) -> list[tuple[Due, bool]]:
    """Due pending rows of `stage` that are unkeyed or their key's head, oldest schedule first.

    Each: (the row, True if it has no key yet). Payloads come back opened (`[store] encryption`).
    """
    (text,) = conn.execute(
        "SELECT json_group_array(json_array(rowid, id, attempts, created_at, CAST(payload AS TEXT), "
        "trace, event_id, json(CASE WHEN order_key IS NULL THEN 'true' ELSE 'false' END))) FROM ("
        "SELECT d.rowid, d.id, d.attempts, d.created_at, e.payload, e.trace, e.id AS event_id, d.order_key "
        "FROM deliveries d JOIN events e ON e.seq = d.event_seq "
        "WHERE d.stage = ? AND d.state = 0 AND d.next_attempt_at <= ? "
        "AND (d.order_key IS NULL OR NOT EXISTS ("
        "SELECT 1 FROM deliveries o WHERE o.stage = d.stage AND o.state = 0 AND o.order_key IS NOT NULL "
        "AND o.order_key = d.order_key AND ((o.order_claimed IS NOT NULL AND d.order_claimed IS NULL) "
        "OR ((o.order_claimed IS NULL) = (d.order_claimed IS NULL) AND (o.order_version < d.order_version "
        "OR (o.order_version = d.order_version AND o.rowid < d.rowid)))))) "
        "ORDER BY d.next_attempt_at, d.rowid LIMIT ?)",
        (stage, now, limit),
    ).fetchone()
    cipher = cipher_of(conn)
    return [
        (
            Due(
                rowid,
                id_,
                attempts,
                created_at,
                payload.encode() if cipher is None else cipher.open(payload.encode()),
                trace,
                event_id,
            ),
            unkeyed,
        )
        for rowid, id_, attempts, created_at, payload, trace, event_id, unkeyed in _rows(text)
    ]


def _mark_superseded(conn: Connection, stage: str, heads: list[int]) -> list[str]:
    """With `coalesce`: mark stale every pending row of the heads' keys, not yet handed out, that
    a newer pending version of its key supersedes. Returns their delivery ids."""
    newest = (
        "(SELECT max(o.order_version) FROM deliveries o WHERE o.stage = deliveries.stage AND o.state = 0 "
        "AND o.order_key IS NOT NULL AND o.order_key = deliveries.order_key)"
    )
    return _marking(
        conn,
        heads,
        f"UPDATE deliveries SET state = {STALE}, finished_at = ?, last_error = 'stale: superseded by "
        f"version ' || {newest} || ', pending' WHERE stage = ? AND state = 0 AND order_claimed IS NULL "
        "AND order_key IN (SELECT order_key FROM deliveries WHERE rowid IN ({marks})) "
        f"AND order_version < {newest} RETURNING id",
        stage,
    )


def _claim(conn: Connection, heads: list[Due]) -> list[Due]:
    """Mark `heads` as handed out: each stays its key's head until delivered or dead."""
    conn.executemany(
        "UPDATE deliveries SET order_claimed = 1 WHERE rowid = ? AND order_claimed IS NULL",
        [(due.rowid,) for due in heads],
    )
    return heads


def _mark_stale(conn: Connection, stage: str, heads: list[int]) -> list[str]:
    """Mark stale every pending row of the heads' keys older than the key's delivered version.
    Returns their delivery ids."""
    delivered = (
        "(SELECT k.version FROM key_versions k WHERE k.stage = deliveries.stage "
        "AND k.key = deliveries.order_key)"
    )
    return _marking(
        conn,
        heads,
        f"UPDATE deliveries SET state = {STALE}, finished_at = ?, last_error = 'stale: version ' || "
        f"order_version || ' is older than ' || {delivered} || ', already delivered' "
        "WHERE stage = ? AND state = 0 AND order_key IN (SELECT order_key FROM deliveries WHERE "
        f"rowid IN ({{marks}})) AND order_version < {delivered} RETURNING id",
        stage,
    )


def _marking(conn: Connection, heads: list[int], template: str, stage: str) -> list[str]:
    """Run an `UPDATE … RETURNING id` over the heads' keys, 500 heads at a time."""
    marked: list[str] = []
    for start in range(0, len(heads), 500):
        chunk = heads[start : start + 500]
        sql = template.replace("{marks}", ",".join("?" * len(chunk)))
        marked += [id_ for (id_,) in conn.execute(sql, [time.time(), stage, *chunk]).fetchall()]
    return marked


__all__ = [
    "MAX_PASSES",
    "PARSERS",
    "Fetched",
    "Ordering",
    "OrderingError",
    "Version",
    "due",
    "number_version",
    "record",
    "rfc3339_version",
    "string_version",
]
