"""Poison isolation in the stages (issue 13): one event whose data makes a stage raise is
dead-lettered with the reason, the rest of its batch goes on, and a store that is unavailable
is waited out, never blamed on an event."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
import trio

from actors.sink.config import BatchConfig
from actors.sink.sink import Sink
from daemon.config.units import Duration
from daemon.errors import StoreUnavailable
from daemon.poison import bisect, reason
from daemon.store import outbox
from daemon.store.schema import DEAD, DELIVERED
from daemon.store.sqlite import Connection, Store
from daemon.store.sqlite_ops import SqliteFunctions
from tests.actors.sink.test_sink import RETRY, FakeSender, settled
from tests.actors.sink.test_sink import ingest as ingest_for_sink
from tests.actors.sink.test_sink import until as until_sink
from tests.actors.transform.test_transformer import caught_up, ingest, make, outputs, until


async def test_bisect_finds_each_bad_item_and_runs_the_rest() -> None:
    runs: list[list[int]] = []
    dead: list[tuple[int, str]] = []

    async def run(items: Any) -> None:
        runs.append(list(items))
        if 3 in items or 6 in items:
            raise ValueError("bad")

    async def died(item: int, exc: Exception) -> None:
        dead.append((item, reason("test", exc)))

    assert await bisect(list(range(8)), run, died) == 2
    assert dead == [(3, "poison: test raised ValueError: bad"), (6, "poison: test raised ValueError: bad")]
    good = [item for part in runs if 3 not in part and 6 not in part for item in part]
    assert sorted(good) == [0, 1, 2, 4, 5, 7]


@pytest.mark.parametrize("error", [StoreUnavailable("disk full"), MemoryError()])
async def test_bisect_does_not_blame_the_store_or_memory_on_the_data(error: BaseException) -> None:
    async def run(items: Any) -> None:
        raise error

    async def died(item: int, exc: Exception) -> None:
        raise AssertionError("dead-lettered a good event")

    with pytest.raises(type(error)):
        await bisect([1, 2, 3], run, died)


def failing_commit(bad: bytes, error: Exception, times: int = 10**9) -> Any:
    """`commit_transform` that raises `error` (up to `times` times) for a batch holding `bad`."""
    real = outbox.commit_transform
    left = [times]

    def commit(conn: Connection, **kwargs: Any) -> int:
        if left[0] > 0 and any(bad in output.payload for output in kwargs["outputs"]):
            left[0] -= 1
            raise error
        return real(conn, **kwargs)

    return commit


def dead_letters(conn: Connection) -> list[tuple[int, int, str]]:
    rows = conn.execute(
        f"SELECT e.payload, d.attempts, d.last_error FROM deliveries d JOIN events e ON e.seq = d.event_seq "
        f"WHERE d.stage = 'shape' AND d.state = {DEAD}"
    )
    return [(json.loads(payload)["n"], attempts, error) for payload, attempts, error in rows.fetchall()]


async def test_a_commit_that_fails_on_one_events_data_is_bisected(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old code: the error ended the actor, and its restart met the same batch again."""
    bad = sqlite3.IntegrityError("one event's data")
    monkeypatch.setattr(SqliteFunctions, "commit_transform", staticmethod(failing_commit(b'"BAD"', bad)))
    transformer = make(store)
    transformer._batch_size = 10
    await ingest(store, *({"n": n, "v": "BAD" if n == 2 else "ok"} for n in range(5)))
    async with trio.open_nursery() as nursery:
        await nursery.start(transformer.run)
        await until(store, caught_up)
        nursery.cancel_scope.cancel()

    assert [payload["n"] for _, payload, _ in await store.call(outputs)] == [0, 1, 3, 4]
    assert await store.call(dead_letters) == [
        (2, 1, "poison: transform shape raised IntegrityError: one event's data")
    ]
    assert transformer.poisoned == 1


async def test_an_unavailable_store_is_waited_out_and_no_event_is_dead_lettered(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    unavailable = StoreUnavailable("store write failed: database or disk is full")
    monkeypatch.setattr(
        SqliteFunctions, "commit_transform", staticmethod(failing_commit(b'"n"', unavailable, times=3))
    )
    transformer = make(store)
    await ingest(store, *({"n": n} for n in range(4)))
    async with trio.open_nursery() as nursery:
        await nursery.start(transformer.run)
        await until(store, caught_up)
        nursery.cancel_scope.cancel()

    assert [payload["n"] for _, payload, _ in await store.call(outputs)] == [0, 1, 2, 3]
    assert await store.call(dead_letters) == []


class RaisingSender(FakeSender):
    """Raises what no sender should (a bug, a payload it cannot encode) for the payload "bad"."""

    async def send(self, batch: Any) -> int | None:
        if any(json.loads(row.payload) == "bad" for row in batch):
            self.batches.append(list(batch))
            raise RecursionError("maximum recursion depth exceeded while encoding a JSON object")
        return await super().send(batch)


async def test_a_send_that_raises_dead_letters_that_delivery_and_bisects_the_batch(store: Store) -> None:
    """Old code: the exception ended the sink actor; its restart sent the same batch again."""
    sender = RaisingSender()
    sink = Sink(
        "crm", store, lambda: sender, retry=RETRY, batch=BatchConfig(max_items=4, max_wait=Duration(1))
    )
    names = ["a", "b", "bad", "c"]
    await ingest_for_sink(store, *names)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        found = await until_sink(store, settled(*names))
        nursery.cancel_scope.cancel()

    assert {name: found[name][0] for name in names} == {
        "a": DELIVERED,
        "b": DELIVERED,
        "bad": DEAD,
        "c": DELIVERED,
    }
    assert found["bad"][4].startswith("poison: sink crm raised RecursionError: maximum recursion depth")
    assert sink.dead == 1
