"""Replay keys of verified webhooks in the outbox: refused while remembered, committed with the event."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.store import outbox
from daemon.store.outbox import Incoming
from daemon.store.sqlite import Connection, open_connection


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[Connection]:
    conn = open_connection(tmp_path / "outbox.db", "normal")
    yield conn
    conn.close()


def _insert(
    conn: Connection, key: str, until: float, body: bytes = b"{}", stream: str = "hook"
) -> tuple[str, bool]:
    return outbox.insert_events(conn, [Incoming(stream, body, None, ["out"], None, (key, until))])[0]


def _events(conn: Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


def test_a_remembered_key_stores_nothing_and_answers_replayed(conn: Connection) -> None:
    later = time.time() + 300
    event_id, duplicate = _insert(conn, "k1", later)
    assert event_id
    assert not duplicate
    assert _insert(conn, "k1", later, b'{"other": 1}') == ("", True)
    assert _insert(conn, "k1", later, stream="other_source")[1] is False  # keys are per source
    assert _events(conn) == 2


def test_copies_within_one_batch_are_stored_once(conn: Connection) -> None:
    later = time.time() + 300
    batch = [Incoming("hook", b"{}", None, ["out"], None, ("same", later)) for _ in range(3)]
    results = outbox.insert_events(conn, batch)
    assert [duplicate for _, duplicate in results] == [False, True, True]
    assert [event_id == "" for event_id, _ in results] == [False, True, True]
    assert _events(conn) == 1


def test_a_key_past_its_window_is_accepted_again_and_pruned(conn: Connection) -> None:
    _insert(conn, "old", time.time() - 1)
    assert _insert(conn, "old", time.time() + 300)[1] is False  # the window had passed
    _insert(conn, "gone", time.time() - 1)
    removed = outbox.prune(conn, retention=3600, dedup_window=3600, readers={})
    assert removed >= 1
    keys = [row[0] for row in conn.execute("SELECT key FROM replay_keys ORDER BY key")]
    assert keys == ["old"]  # renewed with a future window; "gone" pruned


def test_a_rolled_back_commit_forgets_the_key_so_the_sender_may_retry(tmp_path: Path) -> None:
    conn = open_connection(tmp_path / "outbox.db", "normal")
    try:
        conn.execute("BEGIN")
        _insert(conn, "k", time.time() + 300)
        conn.execute("ROLLBACK")  # what a failed group commit does: the 503 the sender saw
        assert _insert(conn, "k", time.time() + 300)[1] is False
    finally:
        conn.close()
    assert (
        sqlite3.connect(tmp_path / "outbox.db").execute("SELECT count(*) FROM replay_keys").fetchone()[0] == 1
    )
