"""Group commit of sink outcomes: coalesced, committed before the rows leave pending, crash-safe."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from actors.sink.commit import Finished, OutcomeCommitter, recorder
from actors.sink.sink import Sink
from daemon.store import outbox
from daemon.store.api import Attempt
from daemon.store.outbox import Connection, Due, Outcomes
from daemon.store.schema import DELIVERED, PENDING
from daemon.store.sqlite import Store
from tests.actors.sink.test_sink import RETRY, FakeSender, ingest

WORKERS = 8


@asynccontextmanager
async def writer_held(store: Store) -> AsyncIterator[threading.Event]:
    """Hold the store's writer thread inside a transaction until the yielded event is set."""
    release, holding = threading.Event(), threading.Event()

    def hold(_: Connection) -> None:
        holding.set()
        assert release.wait(10), "the writer was held for 10 s"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.call, hold)
        with trio.fail_after(5):
            while not holding.is_set():
                await trio.sleep(0.005)
        try:
            yield release
        finally:
            release.set()


def states(path: Path) -> dict[int, int]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT rowid, state FROM deliveries ORDER BY rowid").fetchall())
    finally:
        db.close()


def crash_copy(path: Path, to: Path) -> Path:
    """The database as a kill -9 would leave it now: the file and its WAL (the -shm is rebuilt)."""
    to.mkdir()
    for suffix in ("", "-wal"):
        if Path(f"{path}{suffix}").exists():
            shutil.copyfile(f"{path}{suffix}", to / f"ferry.db{suffix}")
    return to / "ferry.db"


async def pending_dues(store: Store) -> list[Due]:
    return await store.call(lambda conn: outbox.due_deliveries(conn, "crm", 2e9, 100))


async def test_outcomes_finishing_together_share_a_commit_and_wait_for_it(
    store: Store, tmp_path: Path
) -> None:
    await ingest(store, *(f"e{n}" for n in range(WORKERS)))
    dues = await pending_dues(store)
    groups: list[list[int]] = []
    committer = OutcomeCommitter(
        recorder(store, None),
        wake=lambda entries: (),
        settle=lambda entries: None,
        committed=lambda entries: groups.append([entry.batch[0].rowid for entry in entries]),
    )
    returned: list[int] = []

    async def worker(due: Due) -> None:
        await committer.commit(Finished([due], Outcomes([(due.rowid, 200)], [], []), None, 0.01, None))
        returned.append(due.rowid)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        async with writer_held(store):
            for due in dues:
                nursery.start_soon(worker, due)
            await trio.testing.wait_all_tasks_blocked()
            assert returned == []
            assert set(states(store.path).values()) == {PENDING}
            crashed = crash_copy(store.path, tmp_path / "crashed")
        with trio.fail_after(5):
            while len(returned) < WORKERS:
                await trio.sleep(0.005)
        committer.close()

    assert sorted(returned) == [due.rowid for due in dues]
    assert set(states(store.path).values()) == {DELIVERED}
    # The first entry's request was queued behind the hold; every later one joined the next.
    assert len(groups) <= 2
    assert sorted(rowid for group in groups for rowid in group) == [due.rowid for due in dues]
    assert (committer.entries, committer.groups) == (WORKERS, len(groups))
    # A kill -9 while the outcomes waited: every delivery is still pending on disk.
    assert set(states(crashed).values()) == {PENDING}


async def test_a_failing_entry_fails_alone(store: Store) -> None:
    await ingest(store, "a", "b", "c")
    dues = await pending_dues(store)
    bad = dues[1].rowid

    def record_in(conn: Connection, attempts: Sequence[Attempt]) -> None:
        for outcomes, latency, response in attempts:
            if outcomes.delivered[0][0] == bad:
                raise ValueError("no such row")
            outbox.record_outcomes(conn, outcomes, latency, response)

    async def record(attempts: Sequence[Attempt], wake: Sequence[str]) -> None:
        # Raises inside the store's transaction, as a constraint would: the group rolls back.
        await store.call(lambda conn: record_in(conn, attempts), wake=wake)

    settled: list[int] = []
    committer = OutcomeCommitter(
        record,
        wake=lambda entries: (),
        settle=lambda entries: settled.extend(entry.batch[0].rowid for entry in entries),
        committed=lambda entries: None,
    )
    results: dict[int, str] = {}

    async def worker(due: Due) -> None:
        try:
            await committer.commit(Finished([due], Outcomes([(due.rowid, 200)], [], []), None, 0.01, None))
        except ValueError as exc:
            results[due.rowid] = str(exc)
        else:
            results[due.rowid] = "ok"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.run)
        async with writer_held(store):
            for due in dues:
                nursery.start_soon(worker, due)
            await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            while len(results) < len(dues):
                await trio.sleep(0.005)
        committer.close()

    assert results == {dues[0].rowid: "ok", bad: "no such row", dues[2].rowid: "ok"}
    assert sorted(settled) == sorted(due.rowid for due in dues)  # settled whether committed or not
    assert states(store.path) == {dues[0].rowid: DELIVERED, bad: PENDING, dues[2].rowid: DELIVERED}


class GatedSender(FakeSender):
    """Answers 200 once the test opens `gate`: the requests in flight then finish together."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()

    async def send(self, batch: Sequence[Due]) -> int | None:
        status = await super().send(batch)
        await self.gate.wait()
        return status


async def test_a_crash_while_outcomes_wait_resends_them_under_the_same_ids(
    store: Store, tmp_path: Path
) -> None:
    names = [f"e{n}" for n in range(WORKERS)]
    await ingest(store, *names)
    sender = GatedSender()
    sink = Sink("crm", store, lambda: sender, retry=RETRY, concurrency=WORKERS)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        with trio.fail_after(5):
            while len(sender.batches) < WORKERS:
                await trio.sleep(0.005)
        async with writer_held(store):
            sender.gate.set()
            await trio.testing.wait_all_tasks_blocked()
            assert sink.delivered == 0  # every worker is waiting for its outcome's commit
            crashed = crash_copy(store.path, tmp_path / "crashed")
        with trio.fail_after(5):
            while sink.delivered < WORKERS:
                await trio.sleep(0.005)
        nursery.cancel_scope.cancel()
    first = sorted(batch[0].id for batch in sender.batches)
    assert len(first) == WORKERS

    # Restart on the crashed copy: each delivery goes out again, under the same delivery id.
    again = Store.open(crashed, durability="normal")
    resender = FakeSender()
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        sink = Sink("crm", again, lambda: resender, retry=RETRY, concurrency=WORKERS)
        await nursery.start(sink.run)
        with trio.fail_after(5):
            while sink.delivered < WORKERS:
                await trio.sleep(0.005)
        nursery.cancel_scope.cancel()
    again.close()
    assert sorted(batch[0].id for batch in resender.batches) == first
    assert set(states(crashed).values()) == {DELIVERED}
    assert sorted(json.loads(batch[0].payload) for batch in resender.batches) == names


@pytest.mark.parametrize("count", [1, 3])
async def test_close_commits_what_is_left_and_returns(store: Store, count: int) -> None:
    await ingest(store, *(f"e{n}" for n in range(count)))
    dues = await pending_dues(store)
    committer = OutcomeCommitter(
        recorder(store, None),
        wake=lambda entries: (),
        settle=lambda entries: None,
        committed=lambda entries: None,
    )
    async with trio.open_nursery() as nursery:
        for due in dues:
            nursery.start_soon(
                committer.commit, Finished([due], Outcomes([(due.rowid, 200)], [], []), None, 0.0, None)
            )
        await trio.testing.wait_all_tasks_blocked()
        committer.close()
        with trio.fail_after(5):
            await committer.run()
    assert set(states(store.path).values()) == {DELIVERED}
