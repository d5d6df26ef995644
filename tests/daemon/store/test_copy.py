"""`ferry store copy`: a SQLite store filled by the real daemon, copied into a real PostgreSQL database.

The store is filled through the daemon (webhooks in, a receiver that dead-letters some and keeps
others retrying), then copied with the real command line; what arrives is compared row by row.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections import Counter
from contextlib import closing
from pathlib import Path

import psycopg
import pytest

from daemon.errors import StoreKeyMissing
from daemon.store.at_rest import PREFIX, Cipher
from daemon.store.copy import TABLES, CopyRefused, copy_store
from daemon.store.postgres.connect import open_database
from daemon.store.postgres.schema import CLUSTER_TABLES
from daemon.store.sqlite import Store
from tests.fakes import ROOT, Daemon, FakeReceiver, Received, Reply, write_config
from tests.postgres import postgres_url

__all__ = ["postgres_url"]

KEY = "ab" * 32  # a 256-bit key, as 64 hex digits

PIPELINE = """
[sources.hooks]
type = "webhook"
idempotency_header = "Idempotency-Key"

[transforms.shape]
inputs = ["hooks"]
map = '{{n: .n, kind: .kind}}'

[sinks.out]
type = "http"
inputs = ["shape"]
url = "{url}"
retry = {{ max_attempts = 1000, initial_backoff = "100ms", max_backoff = "300ms" }}
"""

ENCRYPTED = """
[store.encryption]
key = "env:FERRY_TEST_STORE_KEY"
"""


def kind_of(request: Received) -> str:
    body = request.json()
    return str(body.get("kind") or body.get("event", {}).get("kind"))


def retries(seen: list[Received]) -> Counter[str]:
    """Attempts seen per idempotency key of the `kind: later` deliveries."""
    return Counter(r.headers["idempotency-key"] for r in seen if kind_of(r) == "later")


def refusing(request: Received) -> Reply:
    """Dead-letter `kind: dead` (400), keep `kind: later` retrying (503), accept the rest."""
    kind = kind_of(request)
    if kind == "dead":
        return 400, {}, b'{"error":"refused for good"}'
    if kind == "later":
        return 503, {}, b'{"error":"not now"}'
    return 200, {}, b"{}"


def fill(tmp_path: Path, *, encrypted: bool = False) -> tuple[Path, Path, FakeReceiver]:
    """Run the daemon until 4 events were delivered, 3 are dead and 3 retrying; stop it.

    Returns the config, the SQLite file and the (still running) receiver."""
    import httpx

    receiver = FakeReceiver(refusing).start()
    config = write_config(tmp_path, PIPELINE.format(url=receiver.url) + (ENCRYPTED if encrypted else ""))
    daemon = Daemon(config, tmp_path / "daemon.log", env={"FERRY_TEST_STORE_KEY": KEY})
    daemon.start()
    try:
        kinds = ["ok"] * 4 + ["dead"] * 3 + ["later"] * 3
        for n, kind in enumerate(kinds):
            answer = httpx.post(
                f"{daemon.url}/hooks/hooks", json={"n": n, "kind": kind}, headers={"Idempotency-Key": f"k{n}"}
            )
            assert answer.status_code == 202, answer.text
        # every retrying delivery has been refused at least twice (so it is pending with attempts)
        receiver.wait_for(
            lambda seen: min(retries(seen).values(), default=0) >= 2 and len(retries(seen)) == 3
        )
        receiver.wait_for(lambda seen: sum(kind_of(r) in ("ok", "dead") for r in seen) >= 7)
    finally:
        daemon.stop()
    return config, tmp_path / "state" / "ferry.db", receiver


def states(db: Path) -> dict[str, tuple[int, int]]:
    with closing(sqlite3.connect(db)) as conn:
        return {
            id_: (state, attempts)
            for id_, state, attempts in conn.execute("SELECT id, state, attempts FROM deliveries")
        }


def pg_states(url: str) -> dict[str, tuple[int, int]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id, state, attempts FROM deliveries").fetchall()
    return {id_: (state, attempts) for id_, state, attempts in rows}


def ferry_store_copy(*args: str, database_url: str = "") -> subprocess.CompletedProcess[str]:
    """`ferry store copy ARGS…` as a real process; `database_url` in $FERRY_TEST_DATABASE_URL."""
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "store", "copy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "FERRY_TEST_DATABASE_URL": database_url},
    )


def test_copy_carries_pending_dead_and_delivered_rows_and_refuses_a_second_time(
    tmp_path: Path, postgres_url: str
) -> None:
    _, db, receiver = fill(tmp_path)
    receiver.stop()
    before = states(db)
    assert sorted(state for state, _ in before.values()) == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    done = ferry_store_copy(str(db), postgres_url)
    assert done.returncode == 0, done.stderr
    assert "counts verified" in done.stdout
    assert pg_states(postgres_url) == before
    with closing(sqlite3.connect(db)) as lite, psycopg.connect(postgres_url) as pg:
        for table in ("cursors", "dedup"):
            ours = sorted(lite.execute(f"SELECT * FROM {table}").fetchall())
            theirs = sorted(tuple(row) for row in pg.execute(f"SELECT * FROM {table}").fetchall())
            assert ours == theirs, table
        events = lite.execute("SELECT seq, id, payload FROM events ORDER BY seq").fetchall()
        copied = pg.execute("SELECT seq, id, payload FROM events ORDER BY seq").fetchall()
        assert [(s, i, bytes(p)) for s, i, p in events] == [(s, i, bytes(p)) for s, i, p in copied]
        # New rows continue after the copied ones.
        (next_seq,) = pg.execute("SELECT nextval('events_seq')").fetchone() or (0,)
        assert next_seq == max(seq for seq, _, _ in events) + 1
    again = ferry_store_copy(str(db), "env:FERRY_TEST_DATABASE_URL", database_url=postgres_url)
    assert again.returncode == 2
    assert "not empty (rows in events" in again.stderr
    assert pg_states(postgres_url) == before  # untouched


def test_a_store_in_use_is_refused(tmp_path: Path, postgres_url: str) -> None:
    receiver = FakeReceiver().start()
    config = write_config(tmp_path, PIPELINE.format(url=receiver.url))
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        with pytest.raises(CopyRefused, match="in use"):
            copy_store(tmp_path / "state" / "ferry.db", postgres_url)
    finally:
        daemon.stop()
        receiver.stop()
    with psycopg.connect(postgres_url) as pg:  # nothing was written, not even the schema
        assert pg.execute("SELECT to_regclass('events')").fetchone() == (None,)


def test_an_encrypted_store_is_copied_sealed_and_needs_its_key(tmp_path: Path, postgres_url: str) -> None:
    _, db, receiver = fill(tmp_path, encrypted=True)
    receiver.stop()
    assert copy_store(db, postgres_url).rows["events"] == 20  # 10 received, 10 transformed
    with psycopg.connect(postgres_url) as pg:
        payloads = [bytes(p) for (p,) in pg.execute("SELECT payload FROM events").fetchall()]
        assert payloads
        assert all(p.startswith(PREFIX) for p in payloads)
    with pytest.raises(StoreKeyMissing):
        open_database(postgres_url, node="t", cipher=None).close()
    cipher = Cipher(bytes.fromhex(KEY), [])
    conn = open_database(postgres_url, node="t", cipher=cipher)
    conn.close()
    assert sum(b'"kind":"dead"' in cipher.open(p) for p in payloads) == 6


def test_bad_sources_are_refused_before_anything_is_written(tmp_path: Path, postgres_url: str) -> None:
    with pytest.raises(CopyRefused, match="no such SQLite store"):
        copy_store(tmp_path / "missing.db", postgres_url)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(CopyRefused, match="not a SQLite database"):
        copy_store(garbage, postgres_url)
    foreign = tmp_path / "foreign.db"
    with closing(sqlite3.connect(foreign)) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(CopyRefused, match="not a ferry store"):
        copy_store(foreign, postgres_url)
    old = tmp_path / "old.db"
    Store.open(old).close()
    with closing(sqlite3.connect(old)) as conn:
        conn.execute("PRAGMA user_version = 3")
    with pytest.raises(CopyRefused, match="schema version 3"):
        copy_store(old, postgres_url)
    done = ferry_store_copy(str(old), "env:FERRY_TEST_UNSET_VARIABLE_FOR_COPY")
    assert done.returncode == 2
    assert "FERRY_TEST_UNSET_VARIABLE_FOR_COPY is not set" in done.stderr
    with psycopg.connect(postgres_url) as pg:
        assert pg.execute("SELECT to_regclass('events')").fetchone() == (None,)


def test_a_database_that_is_not_ferrys_is_refused(tmp_path: Path, postgres_url: str) -> None:
    db = tmp_path / "ferry.db"
    Store.open(db).close()
    with psycopg.connect(postgres_url, autocommit=True) as pg:
        pg.execute("CREATE TABLE customers (id int)")
    done = ferry_store_copy(str(db), postgres_url)
    assert done.returncode == 2
    assert "refused" in done.stderr


def test_the_copy_names_every_table_and_column_of_both_schemas(tmp_path: Path, postgres_url: str) -> None:
    """A migration that adds a table or column fails this until `daemon.store.copy.TABLES` has it."""
    db = tmp_path / "ferry.db"
    Store.open(db).close()
    with closing(sqlite3.connect(db)) as lite:
        lite_tables = {
            name
            for (name,) in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not name.startswith("sqlite_")
        }
        for table, (read, _) in TABLES.items():
            columns = {row[1] for row in lite.execute(f'PRAGMA table_info("{table}")')}
            assert set(read) == columns | ({"rowid"} if "rowid" in read else set()), table
    assert lite_tables == set(TABLES)
    open_database(postgres_url, node="t", cipher=None).close()
    with psycopg.connect(postgres_url) as pg:
        pg_tables = {
            name
            for (name,) in pg.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        }
        # The rest is the cluster's own state (migration 3), which a SQLite store has none of.
        assert pg_tables == set(TABLES) | set(CLUSTER_TABLES) | {"ferry_schema"}
        for table, (_, write) in TABLES.items():
            columns = {
                name
                for (name,) in pg.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = %s", (table,)
                )
            }
            assert columns - {"lease_owner", "lease_until"} == set(write), table
