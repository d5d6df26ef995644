"""The SQLite outbox on real files: identity checks, migrations, group commit, wake-ups, pruning."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from daemon.errors import StoreCorrupt, StoreUnavailable
from daemon.store import ops, outbox
from daemon.store.schema import APPLICATION_ID, DEAD, DELIVERED, MIGRATIONS, PENDING
from daemon.store.sqlite import Connection, Store, open_connection


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[Connection]:
    """A migrated connection for the outbox functions, which are plain functions of a connection."""
    conn = open_connection(tmp_path / "outbox.db", "normal")
    yield conn
    conn.close()


def read(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """What another process would see: a fresh connection reading committed data only."""
    with sqlite3.connect(path) as other:
        return other.execute(sql, args).fetchall()


def files_in(folder: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in folder.iterdir()}


# -- opening ------------------------------------------------------------------------------------


def test_open_creates_and_migrates_a_new_database(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ferry.db"

    Store.open(path).close()

    assert read(path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert read(path, "PRAGMA application_id") == [(APPLICATION_ID,)]
    assert read(path, "PRAGMA journal_mode") == [("wal",)]
    tables = {name for (name,) in read(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"events", "deliveries", "cursors", "dedup", "audit"} <= tables


def test_reopening_keeps_the_data(tmp_path: Path) -> None:
    path = tmp_path / "ferry.db"
    conn = open_connection(path, "full")
    event_id, _ = outbox.insert_event(conn, "demo", b"{}", None, ["crm"])
    conn.close()

    Store.open(path).close()

    assert read(path, "SELECT id FROM events") == [(event_id,)]


def test_foreign_sqlite_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        other.execute("INSERT INTO invoices VALUES (1, 9.5)")
    other.close()
    before = files_in(tmp_path)

    with pytest.raises(StoreCorrupt, match="not a ferry database"):
        Store.open(path)

    assert files_in(tmp_path) == before


@pytest.mark.parametrize(
    "content",
    [b"not a database at all\n" * 100, b"{}", bytes(range(256)) * 16],
    ids=["text", "tiny", "binary"],
)
def test_non_sqlite_file_is_refused_and_left_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ferry.db"
    path.write_bytes(content)

    with pytest.raises(StoreCorrupt, match="left untouched"):
        Store.open(path)

    assert files_in(tmp_path) == {"ferry.db": content}


def test_directory_in_place_of_the_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ferry.db").mkdir()
    with pytest.raises(StoreCorrupt, match="not a regular file"):
        Store.open(tmp_path / "ferry.db")


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ferry.db"
    Store.open(path).close()
    with sqlite3.connect(path) as newer:
        newer.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    newer.close()

    with pytest.raises(StoreCorrupt, match="newer than this ferry"):
        Store.open(path)

    assert read(path, "PRAGMA user_version") == [(len(MIGRATIONS) + 1,)]


def test_unusable_state_directory_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(StoreUnavailable, match="cannot create state directory"):
        Store.open(tmp_path / "blocker" / "ferry.db")


# -- calls --------------------------------------------------------------------------------------


async def test_call_is_unavailable_when_the_store_is_not_running(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "ferry.db")
    with pytest.raises(StoreUnavailable, match="not running"):
        await store.call(lambda conn: 1)

    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        assert await store.call(lambda conn: conn.execute("SELECT 41 + 1").fetchone()[0]) == 42
        nursery.cancel_scope.cancel()

    with pytest.raises(StoreUnavailable, match="not running"):
        await store.call(lambda conn: 1)
    store.close()


async def test_run_without_open_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match=r"open\(\) was not called"):
        await Store(tmp_path / "ferry.db").run()


class Gate:
    """Holds the writer thread inside a request until the test has queued everything else."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self._open = threading.Event()

    def __call__(self, conn: Connection) -> None:
        self.entered.set()
        assert self._open.wait(timeout=10), "gate never opened"

    def open(self) -> None:
        self._open.set()


async def hold_writer(store: Store, nursery: trio.Nursery) -> Gate:
    """Occupy the writer so that requests queue up behind it and are committed as one group."""
    gate = Gate()
    nursery.start_soon(store.call, gate)
    assert await trio.to_thread.run_sync(gate.entered.wait, 5), "the writer never reached the gate"
    return gate


def insert(conn: Connection, n: int) -> int:
    conn.execute("INSERT INTO audit(at, command, arguments, outcome) VALUES (0, ?, '', 'ok')", (f"c{n}",))
    return n


async def test_concurrent_calls_are_group_committed(store: Store) -> None:
    calls = 200
    results: dict[int, int] = {}

    async def one(n: int) -> None:
        results[n] = await store.call(partial(insert, n=n))

    async with trio.open_nursery() as nursery:
        gate = await hold_writer(store, nursery)
        commits_before = store.commits
        for n in range(calls):
            nursery.start_soon(one, n)
        await trio.testing.wait_all_tasks_blocked()
        gate.open()

    assert results == {n: n for n in range(calls)}
    assert store.commits - commits_before < calls
    assert store.commits - commits_before <= 2  # the gate's group, then everything queued behind it
    assert read(store.path, "SELECT count(*) FROM audit") == [(calls,)]


async def test_failing_request_fails_alone_while_its_group_commits(store: Store) -> None:
    def bad(conn: Connection) -> None:
        insert(conn, -1)
        raise ValueError("this request is broken")

    def duplicate_key(conn: Connection) -> None:
        conn.execute("INSERT INTO cursors VALUES ('t', 1)")
        conn.execute("INSERT INTO cursors VALUES ('t', 2)")

    outcomes: dict[str, object] = {}

    async def run(label: str, fn: Callable[[Connection], object]) -> None:
        try:
            outcomes[label] = await store.call(fn)
        except Exception as exc:
            outcomes[label] = exc

    async with trio.open_nursery() as nursery:
        gate = await hold_writer(store, nursery)
        commits_before = store.commits
        nursery.start_soon(run, "first", partial(insert, n=1))
        nursery.start_soon(run, "bad", bad)
        nursery.start_soon(run, "integrity", duplicate_key)
        nursery.start_soon(run, "last", partial(insert, n=2))
        await trio.testing.wait_all_tasks_blocked()
        gate.open()

    assert store.commits - commits_before == 2  # the gate's group and one group for the four
    assert outcomes["first"] == 1
    assert outcomes["last"] == 2
    assert isinstance(outcomes["bad"], ValueError)
    assert isinstance(outcomes["integrity"], sqlite3.IntegrityError)
    assert sorted(read(store.path, "SELECT command FROM audit")) == [("c1",), ("c2",)]
    assert read(store.path, "SELECT * FROM cursors") == []
    assert store.writable


async def test_wake_signals_fire_after_commit(store: Store) -> None:
    signal = store.signal("crm")
    untouched = store.signal("other")
    seen: list[list[tuple[Any, ...]]] = []

    async def consumer() -> None:
        await signal.wait()
        seen.append(read(store.path, "SELECT stream FROM events"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.testing.wait_all_tasks_blocked()
        assert repr(signal) == "<Signal idle>"
        await store.call(
            partial(outbox.insert_event, stream="demo", payload=b"{}", trace=None, sinks=["crm"]),
            wake=["crm"],
        )

    assert seen == [[("demo",)]]
    assert repr(untouched) == "<Signal idle>"


async def test_failed_request_wakes_nobody(store: Store) -> None:
    signal = store.signal("crm")

    def bad(conn: Connection) -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await store.call(bad, wake=["crm"])
    assert repr(signal) == "<Signal idle>"


async def test_signal_coalesces_many_fires_into_one_wake(store: Store) -> None:
    signal = store.signal("crm")
    for _ in range(3):
        await store.call(partial(insert, n=0), wake=["crm", "nobody-listens"])
    assert repr(signal) == "<Signal fired>"

    with trio.fail_after(1):
        await signal.wait()
    assert repr(signal) == "<Signal idle>"


async def test_requests_queued_at_shutdown_still_commit(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "ferry.db")
    done: list[int] = []

    async def one(n: int) -> None:
        done.append(await store.call(partial(insert, n=n)))

    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for n in range(20):
            nursery.start_soon(one, n)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    store.close()

    assert read(tmp_path / "ferry.db", "SELECT count(*) FROM audit") == [(20,)]


# -- outbox functions ---------------------------------------------------------------------------


def test_insert_event_stores_the_event_and_one_delivery_per_sink(conn: Connection) -> None:
    event_id, duplicate = outbox.insert_event(conn, "demo", b'{"a": 1}', "00-trace", ["crm", "log"])

    assert not duplicate
    assert conn.execute("SELECT id, stream, payload, trace FROM events").fetchall() == [
        (event_id, "demo", b'{"a": 1}', "00-trace")
    ]
    assert conn.execute("SELECT id, stage, state, attempts FROM deliveries ORDER BY stage").fetchall() == [
        (f"{event_id}.crm", "crm", PENDING, 0),
        (f"{event_id}.log", "log", PENDING, 0),
    ]


def test_insert_event_deduplicates_within_the_window(conn: Connection) -> None:
    first, _ = outbox.insert_event(conn, "demo", b"1", None, ["crm"], dedup_key="k1", dedup_window=60)

    again, duplicate = outbox.insert_event(conn, "demo", b"2", None, ["crm"], dedup_key="k1", dedup_window=60)
    other_key, other_duplicate = outbox.insert_event(conn, "demo", b"3", None, ["crm"], dedup_key="k2")
    other_source, _ = outbox.insert_event(conn, "other", b"4", None, ["crm"], dedup_key="k1")

    assert (again, duplicate) == (first, True)
    assert not other_duplicate
    assert len({first, other_key, other_source}) == 3
    assert conn.execute("SELECT payload FROM events ORDER BY seq").fetchall() == [(b"1",), (b"3",), (b"4",)]


def test_insert_event_accepts_a_key_again_after_the_window(conn: Connection) -> None:
    first, _ = outbox.insert_event(conn, "demo", b"1", None, ["crm"], dedup_key="k1", dedup_window=60)
    conn.execute("UPDATE dedup SET created_at = created_at - 61")

    again, duplicate = outbox.insert_event(conn, "demo", b"2", None, ["crm"], dedup_key="k1", dedup_window=60)
    third, third_duplicate = outbox.insert_event(
        conn, "demo", b"3", None, ["crm"], dedup_key="k1", dedup_window=60
    )

    assert not duplicate
    assert again != first
    assert (third, third_duplicate) == (again, True)
    assert conn.execute("SELECT count(*) FROM events").fetchone() == (2,)


def age(conn: Connection, seconds: float) -> None:
    """Make every row look `seconds` older."""
    conn.execute("UPDATE events SET received_at = received_at - ?", (seconds,))
    conn.execute(
        "UPDATE deliveries SET created_at = created_at - ?, finished_at = finished_at - ?", (seconds, seconds)
    )
    conn.execute("UPDATE dedup SET created_at = created_at - ?", (seconds,))


def seq_of(conn: Connection, event_id: str) -> int:
    return int(conn.execute("SELECT seq FROM events WHERE id = ?", (event_id,)).fetchone()[0])


def test_prune_removes_delivered_rows_past_retention_only(conn: Connection) -> None:
    delivered, _ = outbox.insert_event(conn, "demo", b"delivered", None, ["crm"], dedup_key="k")
    pending, _ = outbox.insert_event(conn, "demo", b"pending", None, ["crm"])
    dead, _ = outbox.insert_event(conn, "demo", b"dead", None, ["crm"])
    half, _ = outbox.insert_event(conn, "demo", b"half", None, ["crm", "log"])
    rowid = dict(conn.execute("SELECT id, rowid FROM deliveries").fetchall())
    outbox.record_outcomes(
        conn,
        outbox.Outcomes(
            delivered=[(rowid[f"{delivered}.crm"], 200), (rowid[f"{half}.crm"], 200)],
            retry=[],
            dead=[(rowid[f"{dead}.crm"], 400, "bad request")],
        ),
    )
    age(conn, 7200)
    recent, _ = outbox.insert_event(conn, "demo", b"recent", None, ["crm"])
    recent_rowid = conn.execute("SELECT rowid FROM deliveries WHERE id = ?", (f"{recent}.crm",)).fetchone()[0]
    outbox.record_outcomes(conn, outbox.Outcomes([(recent_rowid, 200)], [], []))

    removed = outbox.prune(conn, retention=3600, dedup_window=3600, readers={"demo": []})

    assert removed == 2 + 1 + 1  # two delivered rows, the fully delivered event, its dedup key
    left = dict(conn.execute("SELECT id, state FROM deliveries").fetchall())
    assert left == {
        f"{pending}.crm": PENDING,
        f"{dead}.crm": DEAD,
        f"{half}.log": PENDING,
        f"{recent}.crm": DELIVERED,
    }
    events = {payload for (payload,) in conn.execute("SELECT payload FROM events").fetchall()}
    assert events == {b"pending", b"dead", b"half", b"recent"}
    assert conn.execute("SELECT count(*) FROM dedup").fetchone() == (0,)


def test_prune_keeps_events_a_transform_has_not_passed(conn: Connection) -> None:
    ids = [outbox.insert_event(conn, "demo", str(n).encode(), None, [])[0] for n in range(4)]
    outbox.insert_event(conn, "unconfigured", b"orphan", None, [])
    conn.execute("INSERT INTO cursors VALUES ('shape', ?)", (seq_of(conn, ids[1]),))
    conn.execute("INSERT INTO cursors VALUES ('audit', ?)", (seq_of(conn, ids[2]),))
    age(conn, 7200)

    removed = outbox.prune(conn, retention=3600, dedup_window=3600, readers={"demo": ["shape", "audit"]})

    assert removed == 2
    left = [payload for (payload,) in conn.execute("SELECT payload FROM events ORDER BY seq").fetchall()]
    assert left == [b"2", b"3", b"orphan"]


def test_prune_keeps_young_events_even_when_passed(conn: Connection) -> None:
    event_id, _ = outbox.insert_event(conn, "demo", b"young", None, [])
    conn.execute("INSERT INTO cursors VALUES ('shape', ?)", (seq_of(conn, event_id),))

    assert outbox.prune(conn, retention=3600, dedup_window=3600, readers={"demo": ["shape"]}) == 0


def test_prune_keeps_events_within_the_archive_period_and_no_longer(conn: Connection) -> None:
    outbox.insert_event(conn, "demo", b"old", None, [])
    age(conn, 7200)
    outbox.insert_event(conn, "demo", b"kept", None, [])
    age(conn, 600)  # past the retention, within the archive
    outbox.insert_event(conn, "demo", b"young", None, [])

    removed = outbox.prune(conn, retention=60, archive=3600, dedup_window=3600, readers={"demo": []})

    assert removed == 1
    assert {payload for (payload,) in conn.execute("SELECT payload FROM events")} == {b"kept", b"young"}
    assert outbox.prune(conn, retention=60, archive=0, dedup_window=3600, readers={"demo": []}) == 1


def test_due_deliveries_respect_schedule_and_state(conn: Connection) -> None:
    first, _ = outbox.insert_event(conn, "demo", b"1", None, ["crm"])
    later, _ = outbox.insert_event(conn, "demo", b"2", None, ["crm"])
    rowid = dict(conn.execute("SELECT id, rowid FROM deliveries").fetchall())
    now = float(conn.execute("SELECT max(next_attempt_at) FROM deliveries").fetchone()[0])
    outbox.record_outcomes(conn, outbox.Outcomes([], [(rowid[f"{later}.crm"], now + 30, 503, "busy")], []))

    due = outbox.due_deliveries(conn, "crm", now, limit=10)

    assert [(d.id, d.event_id, d.payload, d.attempts) for d in due] == [(f"{first}.crm", first, b"1", 0)]
    assert outbox.next_due_after(conn, "crm", now) == now + 30
    assert [d.attempts for d in outbox.due_deliveries(conn, "crm", now + 30, limit=10)] == [0, 1]
    assert outbox.due_deliveries(conn, "log", now + 30, limit=10) == []
    assert outbox.counts(conn) == {"crm": {"pending": 2, "delivered": 0, "dead": 0}}


async def test_call_during_shutdown_is_refused_instead_of_hanging(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "ferry.db")
    outcome: list[object] = []

    async def serve(*, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as inner:
            await inner.start(store.run)
            task_status.started(inner.cancel_scope)

    async def late_caller() -> None:
        try:
            outcome.append(await store.call(partial(insert, n=1)))
        except StoreUnavailable as exc:
            outcome.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            scope = await nursery.start(serve)
            gate = await hold_writer(store, nursery)
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()  # store.run waits for its writer, held by the gate
            nursery.start_soon(late_caller)
            await trio.testing.wait_all_tasks_blocked()
            gate.open()
    store.close()

    assert len(outcome) == 1
    assert isinstance(outcome[0], StoreUnavailable)


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (503, "HTTP 503: busy", "http_503"),
        (None, "gave up after 8 attempts: timed out after 10s", "timeout"),
        (None, "connection refused to 127.0.0.1:9", "connection_refused"),
        (None, "connection reset by 10.0.0.1:443", "connection_closed"),
        (None, "cannot resolve crm.invalid", "dns"),
        (None, "TLS certificate of crm.example rejected: expired", "tls"),
        (None, "jq: string and number cannot be added", "jq"),
        (None, "something else", "other"),
    ],
)
async def test_failures_are_grouped_by_error_type(
    store: Store, status: int | None, error: str, expected: str
) -> None:
    def setup(conn: Connection) -> None:
        conn.execute(
            "INSERT INTO deliveries(id, event_seq, stage, state, created_at, next_attempt_at, last_status, "
            "last_error) VALUES ('d', 1, 'crm', 2, 0, 0, ?, ?)",
            (status, error),
        )

    await store.call(setup)
    assert await store.call(ops.error_counts) == [("crm", "dead", status, 1, expected)]


# -- a full disk ----------------------------------------------------------------------------------


def cap_pages(conn: Connection, extra: int) -> None:
    """Let the file grow by `extra` pages at most: SQLite then fails writes as on a full disk."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + extra}")


def big_insert(conn: Connection) -> str:
    conn.execute(
        "INSERT INTO audit(at, command, arguments, outcome) VALUES (0, 'big', ?, 'ok')", ("x" * 200_000,)
    )
    return "stored"


def count_audit(conn: Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])


async def test_a_full_disk_fails_the_writes_that_need_space_and_nothing_else(store: Store) -> None:
    await store.call(partial(cap_pages, extra=0))
    outcomes: dict[str, object] = {}

    async def run(label: str, fn: Callable[[Connection], object]) -> None:
        try:
            outcomes[label] = await store.call(fn)
        except Exception as exc:
            outcomes[label] = exc

    async with trio.open_nursery() as nursery:
        gate = await hold_writer(store, nursery)
        nursery.start_soon(run, "read", count_audit)
        nursery.start_soon(run, "big", big_insert)
        nursery.start_soon(run, "read again", count_audit)
        await trio.testing.wait_all_tasks_blocked()
        gate.open()

    assert isinstance(outcomes["big"], StoreUnavailable)
    assert "full" in str(outcomes["big"])
    assert outcomes["read"] == outcomes["read again"] == 0
    assert not store.writable
    assert read(store.path, "PRAGMA integrity_check") == [("ok",)]


async def test_call_until_committed_waits_out_a_full_disk_and_commits_once(store: Store) -> None:
    await store.call(partial(cap_pages, extra=0))
    result: list[str] = []

    async def persist() -> None:
        result.append(await store.call_until_committed(big_insert, max_backoff=0.05))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(persist)
        with trio.fail_after(5):
            while store.writable:  # until the first try has failed
                await trio.sleep(0.01)
        assert result == []
        await store.call(partial(cap_pages, extra=1000))  # space returns

    assert result == ["stored"]
    with trio.fail_after(5):
        while not store.writable:
            await trio.sleep(0.05)
    assert read(store.path, "SELECT count(*) FROM audit") == [(1,)]


def test_prune_audit_removes_old_rows_only_and_never_a_young_one(conn: Connection) -> None:
    now = time.time()
    for at, command in (
        (now - 900, "a"),
        (now - 800, "b"),
        (now - 10, "c"),
        (now - 700, "stepped back"),
        (now, "d"),
    ):
        conn.execute(
            "INSERT INTO audit(at, command, arguments, outcome) VALUES (?, ?, '{}', 'ok')", (at, command)
        )

    assert ops.prune_audit(conn, retention=600, limit=1) == 1  # bounded per call
    assert ops.prune_audit(conn, retention=600) == 1
    # The cut stops at the first row young enough: a row written after a clock step back waits.
    assert [c for (c,) in conn.execute("SELECT command FROM audit ORDER BY rowid")] == [
        "c",
        "stepped back",
        "d",
    ]
    assert ops.prune_audit(conn, retention=600) == 0
    assert ops.prune_audit(conn, retention=0.0) == 3
