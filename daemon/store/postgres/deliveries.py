"""A sink's deliveries on PostgreSQL: claims with leases, outcomes, quarantine, per-key ordering.

Claims:
    `due_deliveries` picks due pending rows with `FOR UPDATE SKIP LOCKED`, skipping rows whose
    lease another node holds, and leases them to this node (`lease_owner` = the node id,
    `lease_until` = now + the lease) in the same statement. So while a lease holds, no other node
    is handed the row; a node's own rows come back to it at its next fetch (as on SQLite, the
    sink keeps what it already holds) and their lease is renewed. A node that dies (`kill -9`)
    keeps its leases until they expire; then any node claims the rows and resends them under the
    same delivery id (the Idempotency-Key). Lease times are the database's clock
    (`statement_timestamp()`), never a node's: a node whose clock runs ahead does not take
    another's claims early (docs/cluster.md, clock skew).

Outcomes:
    `record_outcomes` writes only rows this node holds the lease of, and ends the lease; an
    outcome for a row whose lease another node took over changes nothing (that node sends it
    again, under the same key). It is not counted: counting would cost a round trip per call
    (the statement's row count needs a pipeline sync), on the per-event delivery path.

Per-key ordering:
    `due_ordered` runs SQLite's algorithm (`daemon.store.ordering`) under a transaction-level
    advisory lock per stage, so one node at a time picks heads; a head leased by another node is
    not a candidate, and the rows behind it are not heads: each key's head is held by one node.
    A key's head is the first entry of its range in the index `deliveries_heads` (head order:
    claimed first, then version, then rowid), so a fetch costs two index probes per key with
    pending rows (a skip scan over the keys, then each key's first entry) plus the rows it
    returns, not a scan of the backlog; rows not keyed yet come from `deliveries_unkeyed`.

Lock order (no deadlock between nodes):
    Advisory locks are taken in one order in every transaction: the events lock
    (`schema.EVENTS_LOCK`, `outbox.lock_events`) first, then a stage's ordering lock. A group
    transaction may hold an ordered fetch and an ingest in either order, so `due_ordered` takes
    the events lock itself before its stage lock (a no-op when the group already inserted
    events): a transaction holding a stage lock never waits for the events lock. The price is
    that an ordered fetch and the cluster's ingest run one after the other, for the few
    milliseconds the fetch takes. Row locks come after both, and an ordered fetch only writes
    rows of the heads it picks (which no other node holds) and of their keys.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Sequence
from typing import Any

from daemon.store.api import Attempt
from daemon.store.keying import Fetched, Ordering, OrderingError, Version
from daemon.store.postgres.connect import Db
from daemon.store.postgres.outbox import lock_events
from daemon.store.types import DEAD, DELIVERED, STALE, Due, Head, quarantine_reason

log = logging.getLogger("ferry.store")
MAX_PASSES = 4
_ORDER_LOCK = 0x46455259 << 32
_WALL = "extract(epoch FROM statement_timestamp())"
"""The database's clock, in epoch seconds: lease times are written and compared with it only."""
_CLAIMABLE = f"(d.lease_until IS NULL OR d.lease_until < {_WALL} OR d.lease_owner = %(node)s)"


def _due(rows: list[Any], db: Db) -> list[Due]:
    cipher = db.cipher
    return [
        Due(
            rowid,
            id_,
            attempts,
            created,
            payload if cipher is None else cipher.open(payload),
            trace,
            event_id,
        )
        for rowid, id_, attempts, created, payload, trace, event_id in rows
    ]


def due_deliveries(db: Db, stage: str, now: float, limit: int) -> list[Due]:
    """Pending deliveries of `stage` due at `now`, oldest schedule first, leased to this node.

    Rows this node holds with more than half their lease left come back as they are, unlocked
    (a sink fetches its held rows again at every fetch); only the others are locked and
    (re-)leased. A fetch that claims nothing new therefore writes nothing, and its commit costs
    the server no WAL flush.
    """
    due = "d.stage = %(stage)s AND d.state = 0 AND d.next_attempt_at <= %(now)s"
    order = "ORDER BY d.next_attempt_at, d.rowid LIMIT %(limit)s"
    rows = db.execute(
        f"WITH mine AS (SELECT d.rowid FROM deliveries d WHERE {due} AND d.lease_owner = %(node)s "
        f"AND d.lease_until >= {_WALL} + %(half)s {order}), "
        f"claimed AS (SELECT d.rowid FROM deliveries d WHERE {due} AND (d.lease_until IS NULL "
        f"OR d.lease_until < {_WALL} OR (d.lease_owner = %(node)s AND d.lease_until < {_WALL} + %(half)s)) "
        f"{order} FOR UPDATE SKIP LOCKED), "
        f"leased AS (UPDATE deliveries d SET lease_owner = %(node)s, lease_until = {_WALL} + %(lease)s "
        "FROM claimed p "
        "WHERE d.rowid = p.rowid) "
        "SELECT d.rowid, d.id, d.attempts, d.created_at, e.payload, e.trace, e.id FROM "
        "(SELECT rowid FROM mine UNION ALL SELECT rowid FROM claimed) p "
        "JOIN deliveries d ON d.rowid = p.rowid JOIN events e ON e.seq = d.event_seq "
        f"ORDER BY d.next_attempt_at, d.rowid LIMIT %(limit)s",
        {
            "stage": stage,
            "now": now,
            "node": db.node,
            "lease": db.lease,
            "half": db.lease / 2,
            "limit": limit,
        },
    ).fetchall()
    return _due(rows, db)


def renew_claims(db: Db, stage: str, rowids: Sequence[int]) -> set[int]:
    """A whole lease more on the pending rows this node still holds (none another node claimed
    since, even after this node's lease ran out); those rows."""
    rows = db.execute(
        f"UPDATE deliveries SET lease_until = {_WALL} + %(lease)s WHERE rowid = ANY(%(ids)s) "
        "AND stage = %(stage)s AND state = 0 AND lease_owner = %(node)s RETURNING rowid",
        {"lease": db.lease, "ids": list(rowids), "stage": stage, "node": db.node},
    ).fetchall()
    return {int(row[0]) for row in rows}


def next_due_after(db: Db, stage: str, now: float) -> float | None:
    row = db.execute(
        "SELECT min(next_attempt_at) FROM deliveries WHERE stage = %s AND state = 0 AND next_attempt_at > %s",
        (stage, now),
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def unpark(db: Db, stage: str, now: float, horizon: float) -> int:
    return db.count(
        "UPDATE deliveries SET next_attempt_at = %s WHERE stage = %s AND state = 0 AND next_attempt_at > %s",
        (now, stage, now + horizon),
    )


Row = tuple[int, int, "int | None", "float | None", "str | None", "float | None", "str | None"]
"""One outcome as `record_outcomes` writes it: rowid, state, status, next attempt, error,
latency, response."""


def outcome_rows(attempts: Sequence[Attempt]) -> list[Row]:
    """Every attempt's outcomes as rows for one statement."""
    rows: list[Row] = []
    for outcomes, latency, response in attempts:
        rows += [
            (rowid, DELIVERED, status, None, None, latency, response) for rowid, status in outcomes.delivered
        ]
        rows += [
            (rowid, 0, status, at, error, latency, response) for rowid, at, status, error in outcomes.retry
        ]
        rows += [
            (rowid, DEAD, status, None, error, latency, response) for rowid, status, error in outcomes.dead
        ]
    return rows


def record_outcomes(db: Db, attempts: Sequence[Attempt], ordering: Ordering | None = None) -> None:
    """`daemon.store.outbox.record_outcomes` for every attempt, in one statement, for the rows
    whose lease this node holds; ends their leases. With `ordering`, each delivered key's version
    is raised in `key_versions` too."""
    rows = outcome_rows(attempts)
    if not rows:
        return
    ids = [row[0] for row in rows]
    db.execute(
        "UPDATE deliveries d SET state = u.state, attempts = d.attempts + 1, "
        "next_attempt_at = coalesce(u.next, d.next_attempt_at), "
        "finished_at = CASE WHEN u.state = 0 THEN d.finished_at ELSE %(now)s END, "
        "last_status = u.status, last_error = u.error, last_latency = u.latency, "
        "last_response = u.response, lease_owner = NULL, lease_until = NULL "
        "FROM unnest(%(ids)s::bigint[], %(states)s::smallint[], %(statuses)s::integer[], "
        "%(nexts)s::float8[], %(errors)s::text[], %(latencies)s::float8[], %(responses)s::text[]) "
        "AS u(rowid, state, status, next, error, latency, response) "
        "WHERE d.rowid = ANY(%(ids)s) AND d.rowid = u.rowid AND d.state = 0 AND d.lease_owner = %(node)s",
        {
            "now": time.time(),
            "ids": ids,
            "states": [row[1] for row in rows],
            "statuses": [row[2] for row in rows],
            "nexts": [row[3] for row in rows],
            "errors": [row[4] for row in rows],
            "latencies": [row[5] for row in rows],
            "responses": [row[6] for row in rows],
            "node": db.node,
        },
    )
    delivered = [row[0] for row in rows if row[1] == DELIVERED]
    if ordering is not None and delivered:
        db.execute(
            "INSERT INTO key_versions(stage, key, number, string, delivered_at) "
            "SELECT stage, order_key, order_number, order_string, %s FROM deliveries "
            "WHERE rowid = ANY(%s) AND order_key IS NOT NULL AND state = %s "
            "ON CONFLICT (stage, key) DO UPDATE SET number = excluded.number, string = excluded.string, "
            "delivered_at = excluded.delivered_at WHERE (coalesce(excluded.number, 0), "
            "coalesce(excluded.string, '')) > "
            "(coalesce(key_versions.number, 0), coalesce(key_versions.string, ''))",
            (time.time(), delivered, DELIVERED),
        )


def check_head(db: Db, stage: str, quarantine_after: int) -> tuple[Due, int] | None:
    """`daemon.store.quarantine.check_head` on PostgreSQL: the head is the first due row no other
    node holds, and the incarnations counted are this node's (`stage@node` in `stage_heads`): a
    sink runs on every node, and N nodes starting beside each other are not N crashes."""
    wall = time.time()
    rows = db.execute(
        "SELECT d.rowid, d.id, d.attempts, d.created_at, e.payload, e.trace, e.id FROM deliveries d "
        "JOIN events e ON e.seq = d.event_seq WHERE d.stage = %(stage)s AND d.state = 0 "
        f"AND d.next_attempt_at <= %(wall)s AND {_CLAIMABLE} ORDER BY d.next_attempt_at, d.rowid LIMIT 1",
        {"stage": stage, "wall": wall, "node": db.node},
    ).fetchall()
    if not rows:
        return None
    (due,) = _due(rows, db)
    head = attempt_head(db, f"{stage}@{db.node}", due.rowid, due.rowid)
    if head.attempts <= quarantine_after:
        return None
    crashes = head.attempts - 1
    db.execute(
        f"UPDATE deliveries SET state = {DEAD}, attempts = attempts + %s, finished_at = %s, last_error = %s, "
        "lease_owner = NULL, lease_until = NULL WHERE rowid = %s",
        (crashes, time.time(), quarantine_reason(f"sink {stage}", crashes), due.rowid),
    )
    return due, crashes


def read_head(db: Db, stage: str) -> Head | None:
    row = db.execute("SELECT head, until, attempts FROM stage_heads WHERE stage = %s", (stage,)).fetchone()
    return Head(int(row[0]), int(row[1]), int(row[2])) if row else None


def attempt_head(db: Db, stage: str, head: int, until: int) -> Head:
    """`daemon.store.quarantine.attempt_head` on PostgreSQL."""
    old = read_head(db, stage)
    if old is not None and old.head == head:
        new = Head(head, max(until, old.until), old.attempts + 1)
    else:
        new = Head(head, until, 1)
    db.execute(
        "INSERT INTO stage_heads(stage, head, until, attempts) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (stage) DO UPDATE SET head = excluded.head, until = excluded.until, "
        "attempts = excluded.attempts",
        (stage, *new),
    )
    return new


# -- per-key ordering ----------------------------------------------------------------------------

# A row's version as one comparable pair (a sink's versions are all numbers or all strings).
_VERSION = "(coalesce({t}.order_number, 0), coalesce({t}.order_string, ''))"
_EMPTY = "coalesce({t}, '')"


def due_ordered(db: Db, ordering: Ordering, stage: str, now: float, limit: int) -> Fetched:
    """`daemon.store.ordering.due` on PostgreSQL, one node at a time per stage (module docstring)."""
    lock_events(db)  # first: the lock order of the module docstring
    db.execute("SELECT pg_advisory_xact_lock(%s)", (_ORDER_LOCK | zlib.crc32(stage.encode()),))
    stale: list[str] = []
    dead: list[tuple[str, str]] = []
    for _ in range(MAX_PASSES):
        rows = _candidates(db, stage, now, limit)
        fresh = [due for due, unkeyed in rows if unkeyed]
        if fresh:
            dead += _key_rows(db, ordering, fresh)
            continue
        heads = [due.rowid for due, _ in rows]
        marked = _mark_stale(db, stage, heads)
        if ordering.config.coalesce:
            marked += _mark_superseded(db, stage, heads)
        if marked:
            stale += marked
            continue
        db.execute(
            f"UPDATE deliveries SET order_claimed = 1, lease_owner = %s, lease_until = {_WALL} + %s "
            "WHERE rowid = ANY(%s)",
            (db.node, db.lease, heads),
        )
        return Fetched([due for due, _ in rows], False, stale, dead)
    return Fetched([], True, stale, dead)


_HEAD_ORDER = "(d.order_claimed IS NULL), coalesce(d.order_number, 0), coalesce(d.order_string, ''), d.rowid"
"""The head order of a key's pending rows (claimed first, then version, then rowid): the order of
the index `deliveries_heads`, so a key's head is the first entry of its range."""
_PENDING = "stage = %(stage)s AND state = 0"
CANDIDATES = (
    # The stage's keys with pending rows, one index probe each (a skip scan over `deliveries_heads`).
    "WITH RECURSIVE keys(k) AS ("
    f"(SELECT order_key FROM deliveries WHERE {_PENDING} AND order_key IS NOT NULL "
    "ORDER BY order_key LIMIT 1) "
    f"UNION ALL SELECT (SELECT o.order_key FROM deliveries o WHERE o.{_PENDING} AND o.order_key IS NOT NULL "
    "AND o.order_key > keys.k ORDER BY o.order_key LIMIT 1) FROM keys WHERE keys.k IS NOT NULL), "
    # Each key's head (one more probe), kept when it is due and no other node holds it.
    "heads AS (SELECT d.rowid FROM keys CROSS JOIN LATERAL (SELECT d.rowid, d.next_attempt_at, "
    f"d.lease_owner, d.lease_until FROM deliveries d WHERE d.{_PENDING} AND d.order_key IS NOT NULL "
    f"AND d.order_key = keys.k ORDER BY {_HEAD_ORDER} LIMIT 1) d WHERE keys.k IS NOT NULL "
    f"AND d.next_attempt_at <= %(now)s AND {_CLAIMABLE}), "
    # Rows not keyed yet (`deliveries_unkeyed`).
    f"unkeyed AS (SELECT d.rowid FROM deliveries d WHERE d.{_PENDING} AND d.order_key IS NULL "
    f"AND d.next_attempt_at <= %(now)s AND {_CLAIMABLE} ORDER BY d.next_attempt_at, d.rowid "
    "LIMIT %(limit)s) "
    "SELECT d.rowid, d.id, d.attempts, d.created_at, e.payload, e.trace, e.id, d.order_key IS NULL "
    "FROM (SELECT rowid FROM heads UNION ALL SELECT rowid FROM unkeyed) p "
    "JOIN deliveries d ON d.rowid = p.rowid JOIN events e ON e.seq = d.event_seq "
    "ORDER BY d.next_attempt_at, d.rowid LIMIT %(limit)s"
)
"""Due pending rows of a stage, unkeyed or their key's head, that no other node holds. Its cost
is two index probes per key with pending rows plus the rows returned, whatever the backlog."""


def _candidates(db: Db, stage: str, now: float, limit: int) -> list[tuple[Due, bool]]:
    """Due pending rows of `stage`, unkeyed or their key's head, that no other node holds."""
    rows = db.execute(CANDIDATES, {"stage": stage, "now": now, "node": db.node, "limit": limit}).fetchall()
    return [(due, bool(row[7])) for due, row in zip(_due([row[:7] for row in rows], db), rows, strict=True)]


def _key_rows(db: Db, ordering: Ordering, rows: Sequence[Due]) -> list[tuple[str, str]]:
    results = ordering.identify_all([due.payload for due in rows])
    keyed: list[tuple[str, Version, int]] = []
    failed: list[tuple[Due, str]] = []
    for due, result in zip(rows, results, strict=True):
        if isinstance(result, OrderingError):
            failed.append((due, str(result)))
        else:
            keyed.append((result[0], result[1], due.rowid))
    if keyed:
        db.execute(
            "UPDATE deliveries d SET order_key = u.k, order_number = u.n, order_string = u.s "
            "FROM unnest(%s::text[], %s::float8[], %s::text[], %s::bigint[]) AS u(k, n, s, "
            "r) WHERE d.rowid = u.r",
            (
                [k for k, _, _ in keyed],
                [v if isinstance(v, float) else None for _, v, _ in keyed],
                [v if isinstance(v, str) else None for _, v, _ in keyed],
                [r for _, _, r in keyed],
            ),
        )
    if failed:
        db.execute(
            f"UPDATE deliveries d SET state = {DEAD}, finished_at = %s, last_error = u.e, "
            "lease_owner = NULL, "
            "lease_until = NULL FROM unnest(%s::text[], %s::bigint[]) AS u(e, r) WHERE d.rowid = u.r",
            (time.time(), [reason for _, reason in failed], [due.rowid for due, _ in failed]),
        )
    return [(due.id, reason) for due, reason in failed]


def _shown(table: str) -> str:
    """A row's version as text, as SQLite shows it in the stale reason."""
    return f"coalesce({table}.order_string, {table}.order_number::text)"


# The heads' keys, each with both head groups (claimed rows, then the others: `_HEAD_ORDER`).
_HEAD_KEYS = (
    "heads AS (SELECT DISTINCT h.order_key AS key FROM deliveries h WHERE h.rowid = ANY(%(heads)s) "
    "AND h.order_key IS NOT NULL), groups AS (SELECT heads.key, g.unclaimed FROM heads "
    "CROSS JOIN (VALUES (false), (true)) g(unclaimed))"
)
# A key's pending rows of one head group, as an index range of `deliveries_heads`. `OFFSET 0`
# keeps a range subquery a per-key index scan: flattened into a join, the planner (without
# statistics on a young table) joins every pending row of the stage instead.
_RANGE = (
    "o.stage = %(stage)s AND o.state = 0 AND o.order_key IS NOT NULL AND o.order_key = {key} "
    "AND (o.order_claimed IS NULL) = {unclaimed}"
)
_O_VERSION = _VERSION.format(t="o")


def _mark_stale(db: Db, stage: str, heads: list[int]) -> list[str]:
    """Mark stale the pending rows of the heads' keys older than the key's delivered version:
    the front of each head group's index range, read up to the first row not older."""
    rows = db.execute(
        f"WITH {_HEAD_KEYS}, old AS (SELECT o.rowid, {_shown('o')} AS shown, "
        "coalesce(k.string, k.number::text) AS delivered FROM groups JOIN key_versions k "
        "ON k.stage = %(stage)s AND k.key = groups.key CROSS JOIN LATERAL (SELECT o.* FROM deliveries o "
        f"WHERE {_RANGE.format(key='groups.key', unclaimed='groups.unclaimed')} AND {_O_VERSION} < "
        f"(coalesce(k.number, 0), {_EMPTY.format(t='k.string')}) OFFSET 0) o) "
        f"UPDATE deliveries d SET state = {STALE}, finished_at = %(now)s, last_error = 'stale: version ' "
        "|| old.shown || ' is older than ' || old.delivered || ', already delivered' "
        "FROM old WHERE d.rowid = old.rowid AND d.state = 0 RETURNING d.id",
        {"now": time.time(), "stage": stage, "heads": heads},
    ).fetchall()
    return [id_ for (id_,) in rows]


def _mark_superseded(db: Db, stage: str, heads: list[int]) -> list[str]:
    """With `coalesce`: mark stale the rows of the heads' keys not yet handed out that a newer
    pending version supersedes. The newest version of a key is the last entry of one of its two
    head groups (two backward probes); the rows it supersedes are the front of the unclaimed
    group's range, each of which this marks."""
    rows = db.execute(
        f"WITH {_HEAD_KEYS}, last AS (SELECT groups.key, o.shown, o.v1, o.v2 FROM groups "
        f"CROSS JOIN LATERAL (SELECT {_shown('o')} AS shown, coalesce(o.order_number, 0) AS v1, "
        f"{_EMPTY.format(t='o.order_string')} AS v2 FROM deliveries o "
        f"WHERE {_RANGE.format(key='groups.key', unclaimed='groups.unclaimed')} "
        "ORDER BY (o.order_claimed IS NULL) DESC, coalesce(o.order_number, 0) DESC, "
        f"{_EMPTY.format(t='o.order_string')} DESC, o.rowid DESC LIMIT 1) o), "
        "newest AS (SELECT DISTINCT ON (key) key, shown, v1, v2 FROM last ORDER BY key, v1 DESC, v2 DESC), "
        "old AS (SELECT o.rowid, newest.shown FROM newest CROSS JOIN LATERAL (SELECT o.rowid FROM "
        f"deliveries o WHERE {_RANGE.format(key='newest.key', unclaimed='true')} "
        f"AND {_O_VERSION} < (newest.v1, newest.v2) OFFSET 0) o) "
        f"UPDATE deliveries d SET state = {STALE}, finished_at = %(now)s, last_error = 'stale: "
        "superseded by version ' || old.shown || ', pending' FROM old WHERE d.rowid = old.rowid "
        "AND d.state = 0 RETURNING d.id",
        {"now": time.time(), "stage": stage, "heads": heads},
    ).fetchall()
    return [id_ for (id_,) in rows]
