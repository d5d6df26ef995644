"""Per-key ordering on a real SQLite file: heads per key, version order, staleness, bad versions."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config.sync import OrderingConfig
from daemon.store import ordering as ordering_sql
from daemon.store import outbox
from daemon.store.at_rest import Cipher
from daemon.store.ordering import Ordering, OrderingError, number_version, rfc3339_version, string_version
from daemon.store.outbox import Due, Outcomes
from daemon.store.schema import STALE
from daemon.store.sqlite import Connection, open_connection


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[Connection]:
    conn = open_connection(tmp_path / "outbox.db", "normal")
    yield conn
    conn.close()


def ordering(compare: str = "number") -> Ordering:
    return Ordering(OrderingConfig(key=".email", version=".v", compare=compare))  # type: ignore[arg-type]


def add(conn: Connection, email: Any, v: Any, **extra: Any) -> str:
    event_id, _ = outbox.insert_event(
        conn, "demo", json.dumps({"email": email, "v": v, **extra}).encode(), None, ["crm"]
    )
    return event_id


def fetch(
    conn: Connection, order: Ordering, now: float | None = None, limit: int = 100
) -> list[tuple[str, Any]]:
    fetched = ordering_sql.due(conn, order, "crm", time.time() + 1 if now is None else now, limit)
    return [(body["email"], body["v"]) for body in (json.loads(due.payload) for due in fetched.rows)]


def due_rows(conn: Connection, order: Ordering) -> list[Due]:
    return ordering_sql.due(conn, order, "crm", time.time() + 1, 100).rows


def deliver(conn: Connection, order: Ordering, rows: list[Due]) -> None:
    ordering_sql.record(conn, Outcomes([(due.rowid, 200) for due in rows], [], []))


def states(conn: Connection) -> list[tuple[str, int, str | None]]:
    return conn.execute(
        "SELECT json_extract(e.payload, '$.email') || ':' || json_extract(e.payload, '$.v'), d.state, "
        "d.last_error FROM deliveries d JOIN events e ON e.seq = d.event_seq ORDER BY d.rowid"
    ).fetchall()


# -- versions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, 3.0), (-1.5, -1.5), ("42", 42.0), (" 1e3 ", 1000.0), ("0.5", 0.5), (1700000000123, 1700000000123.0)],
)
def test_number_versions(value: Any, expected: float) -> None:
    assert number_version(value) == expected


@pytest.mark.parametrize("value", [None, True, "abc", "", "1.2.3", "nan", "inf", [1], {"a": 1}])
def test_bad_number_versions_say_why(value: Any) -> None:
    with pytest.raises(OrderingError, match="is not a number"):
        number_version(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-25T15:20:38Z", "2026-11-25T15:20:38.000000Z"),
        ("2026-11-25T15:20:38.000+0000", "2026-11-25T15:20:38.000000Z"),  # Salesforce's LastModifiedDate
        ("2026-11-25T16:20:38.5+01:00", "2026-11-25T15:20:38.500000Z"),
        ("2026-11-25T15:20:38.123456789Z", "2026-11-25T15:20:38.123456Z"),
    ],
)
def test_rfc3339_versions_compare_as_instants(value: str, expected: str) -> None:
    assert rfc3339_version(value) == expected


def test_rfc3339_versions_order_across_zones() -> None:
    earlier, later = rfc3339_version("2026-11-25T16:00:00+01:00"), rfc3339_version("2026-11-25T15:30:00Z")
    assert earlier < later


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("yesterday", "is not an RFC 3339 timestamp"),
        ("2026-11-25", "is a date without a time"),
        ("2026-11-25T15:20:38", "has no time zone"),
        (1700000000, "is not an RFC 3339 timestamp"),
        (None, "is not an RFC 3339 timestamp"),
    ],
)
def test_bad_rfc3339_versions_say_why(value: Any, reason: str) -> None:
    with pytest.raises(OrderingError, match=reason):
        rfc3339_version(value)


def test_string_versions_must_be_strings() -> None:
    assert string_version("b") > string_version("a")
    with pytest.raises(OrderingError, match="is not a string"):
        string_version(2)


# -- heads, version order, staleness --------------------------------------------------------------


def test_only_each_keys_lowest_version_is_due(conn: Connection) -> None:
    order = ordering()
    add(conn, "a", 1)
    add(conn, "a", 3)
    add(conn, "a", 2)
    add(conn, "b", 7)

    assert fetch(conn, order) == [("a", 1), ("b", 7)]
    assert fetch(conn, order) == [("a", 1), ("b", 7)], "nothing moves until an outcome is recorded"


def test_deliveries_of_one_key_leave_in_version_order(conn: Connection) -> None:
    order = ordering()
    for v in (5, 1, 4, 2, 3):
        add(conn, "a", v)
    sent = []
    while rows := due_rows(conn, order):
        assert len(rows) == 1
        sent.append(json.loads(rows[0].payload)["v"])
        deliver(conn, order, rows)
    assert sent == [1, 2, 3, 4, 5]


def test_older_version_than_the_delivered_one_is_stale_and_never_sent(conn: Connection) -> None:
    order = ordering()
    add(conn, "a", 5)
    deliver(conn, order, due_rows(conn, order))
    add(conn, "a", 3)  # an out-of-order webhook
    add(conn, "a", 5)  # a replay of the same version: delivered again
    add(conn, "a", 6)

    fetched = ordering_sql.due(conn, order, "crm", time.time() + 1, 100)

    assert fetched.stale == 1
    assert [json.loads(due.payload)["v"] for due in fetched.rows] == [5]
    assert states(conn)[1] == ("a:3", STALE, "stale: version 3.0 is older than 5.0, already delivered")
    assert outbox.counts(conn)["crm"] == {"pending": 2, "delivered": 1, "dead": 0, "stale": 1}


def test_stale_rfc3339_versions_name_both_instants(conn: Connection) -> None:
    order = ordering("rfc3339")
    add(conn, "a", "2026-11-25T15:00:00.000+0000")
    deliver(conn, order, due_rows(conn, order))
    add(conn, "a", "2026-11-25T15:59:00+01:00")  # 14:59Z: older

    assert fetch(conn, order) == []
    assert states(conn)[1][1:] == (
        STALE,
        "stale: version 2026-11-25T14:59:00.000000Z is older than 2026-11-25T15:00:00.000000Z, "
        "already delivered",
    )


def test_a_retrying_key_holds_back_only_itself(conn: Connection) -> None:
    order = ordering()
    add(conn, "a", 1)
    add(conn, "a", 2)
    add(conn, "b", 1)
    add(conn, "b", 2)
    first = due_rows(conn, order)
    a1 = next(due for due in first if json.loads(due.payload)["email"] == "a")
    b1 = next(due for due in first if json.loads(due.payload)["email"] == "b")
    later = time.time() + 3600
    ordering_sql.record(conn, Outcomes([(b1.rowid, 200)], [(a1.rowid, later, 503, "HTTP 503")], []))

    assert fetch(conn, order) == [("b", 2)]
    assert fetch(conn, order, now=later + 1) == [("b", 2), ("a", 1)]  # oldest schedule first


def test_a_dead_head_lets_its_key_move_on(conn: Connection) -> None:
    order = ordering()
    add(conn, "a", 1)
    add(conn, "a", 2)
    (a1,) = due_rows(conn, order)
    ordering_sql.record(conn, Outcomes([], [], [(a1.rowid, 422, "HTTP 422")]))

    assert fetch(conn, order) == [("a", 2)]


def test_many_blocked_rows_of_one_key_do_not_starve_other_keys(conn: Connection) -> None:
    order = ordering()
    add(conn, "a", 0)
    (head,) = due_rows(conn, order)
    ordering_sql.record(conn, Outcomes([], [(head.rowid, time.time() + 3600, 503, "HTTP 503")], []))
    for v in range(1, 300):
        add(conn, "a", v)
    add(conn, "b", 1)

    fetched = ordering_sql.due(conn, order, "crm", time.time() + 1, 10)
    while fetched.more:
        fetched = ordering_sql.due(conn, order, "crm", time.time() + 1, 10)

    assert [json.loads(due.payload)["email"] for due in fetched.rows] == ["b"]


@pytest.mark.parametrize(
    ("email", "v", "reason"),
    [
        (None, 1, "ordering: key .email is null, expected a string or number"),
        ({"x": 1}, 1, 'ordering: key .email is {"x":1}, expected a string or number'),
        ("a", "soon", 'ordering: version .v of key "a" is not a number: "soon"'),
        ("a", None, 'ordering: version .v of key "a" is not a number: null'),
    ],
)
def test_unreadable_key_or_version_is_dead_lettered_with_the_reason(
    conn: Connection, email: Any, v: Any, reason: str
) -> None:
    order = ordering()
    add(conn, email, v)
    add(conn, "b", 1)

    fetched = ordering_sql.due(conn, order, "crm", time.time() + 1, 100)

    assert fetched.dead == 1
    assert [json.loads(due.payload)["email"] for due in fetched.rows] == ["b"]
    assert states(conn)[0][1:] == (2, reason)


def test_jq_error_in_the_key_is_dead_lettered(conn: Connection) -> None:
    order = Ordering(OrderingConfig(key=".email | ascii_downcase", version=".v"))
    add(conn, 5, 1)
    add(conn, "B", 1)

    fetched = ordering_sql.due(conn, order, "crm", time.time() + 1, 100)

    assert fetched.dead == 1
    assert len(fetched.rows) == 1
    (error,) = [row[2] for row in states(conn) if row[1] == 2]
    assert error is not None
    assert error.startswith("ordering: jq: ")


def test_a_number_key_and_the_same_digits_as_a_string_are_one_record(conn: Connection) -> None:
    order = ordering()
    add(conn, 7, 2)
    add(conn, "7", 1)
    assert fetch(conn, order) == [("7", 1)]


def test_stale_rows_are_pruned_like_delivered_ones(conn: Connection) -> None:
    order = ordering()
    add(conn, "a", 2)
    deliver(conn, order, due_rows(conn, order))
    add(conn, "a", 1)
    ordering_sql.due(conn, order, "crm", time.time() + 1, 100)
    conn.execute("UPDATE deliveries SET finished_at = finished_at - 7200")

    outbox.prune(conn, retention=3600, dedup_window=3600, readers={"demo": []})

    assert conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 0
    assert conn.execute("SELECT version FROM key_versions").fetchall() == [(2.0,)], "versions outlive pruning"


def test_the_due_query_uses_the_partial_key_index(conn: Connection) -> None:
    plan = " ".join(
        str(row)
        for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT 1 FROM deliveries o WHERE o.stage = 'crm' AND o.state = 0 "
            "AND o.order_key IS NOT NULL AND o.order_key = 'a' AND o.order_version < 3"
        )
    )
    assert "deliveries_by_key" in plan


def test_a_lower_version_arriving_while_a_higher_is_out_waits_and_turns_stale(conn: Connection) -> None:
    order = ordering()
    add(conn, "a", 8)
    (eight,) = due_rows(conn, order)  # handed to the sender, no outcome yet
    add(conn, "a", 3)

    assert fetch(conn, order) == [("a", 8)], "8 stays the head (a request for it may have been applied)"
    deliver(conn, order, [eight])
    assert fetch(conn, order) == []
    assert states(conn)[1][1] == STALE


def test_the_claimed_head_survives_a_restart(tmp_path: Path) -> None:
    order = ordering()
    first = open_connection(tmp_path / "k.db", "normal")
    add(first, "a", 8)
    due_rows(first, order)
    first.close()  # a crash: the outcome of 8 is unknown
    again = open_connection(tmp_path / "k.db", "normal")
    add(again, "a", 3)

    assert fetch(again, order) == [("a", 8)]
    again.close()


def test_encrypted_payloads_are_keyed_and_sent_opened(tmp_path: Path) -> None:
    cipher = Cipher(os.urandom(32))
    sealed = open_connection(tmp_path / "sealed.db", "normal", cipher=cipher)
    order = ordering()
    add(sealed, "a", 2)
    add(sealed, "a", 1)

    assert fetch(sealed, order) == [("a", 1)]
    (stored,) = sealed.execute("SELECT DISTINCT substr(CAST(payload AS TEXT), 1, 5) FROM events").fetchone()
    assert stored == "!fe1."
    sealed.close()


def coalescing() -> Ordering:
    return Ordering(OrderingConfig(key=".email", version=".v", coalesce=True))


def test_coalescing_sends_only_the_newest_pending_version(conn: Connection) -> None:
    order = coalescing()
    for v in (1, 4, 2, 3):
        add(conn, "a", v)
    add(conn, "b", 1)

    fetched = ordering_sql.due(conn, order, "crm", time.time() + 1, 100)

    assert sorted((json.loads(d.payload)["email"], json.loads(d.payload)["v"]) for d in fetched.rows) == [
        ("a", 4),
        ("b", 1),
    ]
    assert fetched.stale == 3
    assert [row[2] for row in states(conn) if row[1] == STALE] == [
        "stale: superseded by version 4.0, pending"
    ] * 3


def test_coalescing_never_drops_a_head_already_handed_out(conn: Connection) -> None:
    order = coalescing()
    add(conn, "a", 1)
    (one,) = due_rows(conn, order)
    add(conn, "a", 2)
    add(conn, "a", 3)

    assert fetch(conn, order) == [("a", 1)], "1 is out: it stays the head"
    deliver(conn, order, [one])
    assert fetch(conn, order) == [("a", 3)]
    assert [row[0] for row in states(conn) if row[1] == STALE] == ["a:2"]


def test_an_unsettled_window_returns_nothing_unchecked_and_asks_to_come_back(conn: Connection) -> None:
    order = ordering()
    for email in ("a", "b", "c"):
        add(conn, email, 5)
    deliver(conn, order, ordering_sql.due(conn, order, "crm", time.time() + 1, 100).rows)
    for email in ("a", "b", "c"):
        add(conn, email, 3)  # stale, one round each to key and to mark with a window of one
    add(conn, "d", 1)

    first = ordering_sql.due(conn, order, "crm", time.time() + 1, 1)
    assert (first.rows, first.more) == ([], True)
    second = ordering_sql.due(conn, order, "crm", time.time() + 1, 1)
    assert [json.loads(due.payload) for due in second.rows] == [{"email": "d", "v": 1}]
    assert first.stale + second.stale == 3
