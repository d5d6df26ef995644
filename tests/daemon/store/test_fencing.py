"""A singleton's commits on the PostgreSQL store check its fence in the same transaction.

Real server (`postgres_url`), the real `PostgresStore` and `PostgresCoordination` on one database:
node A takes a lease, loses it to node B; A's commits under its old fence raise `LeaseLost` and
write nothing, B's commit under the current fence lands, and what runs under no fence (SQLite's
single node, a sink) is not checked at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest
import trio

from daemon.errors import LeaseLost
from daemon.store.coordination import NodeInfo
from daemon.store.fencing import Fence, fenced
from daemon.store.leases import PostgresCoordination
from daemon.store.postgres.store import PostgresStore
from daemon.store.types import AlertState, Derived, Incoming, PollState
from tests.postgres import ferry_database, postgres_url

__all__ = ["ferry_database", "postgres_url"]

A = NodeInfo("node-a", "host-a", "127.0.0.1:8001", 1)
B = NodeInfo("node-b", "host-b", "127.0.0.1:8002", 2)


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore.open(postgres_url, node="node-a")
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        yield store
        nursery.cancel_scope.cancel()
    store.close()


@pytest.fixture
async def coordination(ferry_database: str) -> AsyncIterator[PostgresCoordination]:
    coordination = PostgresCoordination(ferry_database, timeout=2.0)
    yield coordination
    await coordination.close()


async def _taken_over(coordination: PostgresCoordination, lease: str) -> tuple[Fence, Fence]:
    """A takes `lease`, it expires, B takes it: (A's stale fence, B's current one)."""
    first = await coordination.beat(A, {}, [lease], ttl=0.3)
    with trio.fail_after(10):
        while not (second := await coordination.beat(B, {}, [lease], ttl=30)).granted:
            await trio.sleep(0.05)
    return Fence(lease, A.id, first.granted[lease]), Fence(lease, B.id, second.granted[lease])


async def test_a_transform_commit_under_a_stale_fence_is_refused_and_writes_nothing(
    store: PostgresStore, coordination: PostgresCoordination
) -> None:
    (event_id, _), *_ = await store.insert_events(
        [Incoming("hooks", msgspec.json.encode({"n": 1}), None, ())], dedup_window=3600
    )
    (stored,) = await store.read_events(["hooks"], 0, 10)
    stale, current = await _taken_over(coordination, "transform.shape")
    with fenced(stale), pytest.raises(LeaseLost, match=r"transform\.shape"):
        await store.commit_transform("shape", stored.seq, [Derived(stored, 0, b'"x"')], [], ["crm"])
    assert await store.cursor("shape") == 0
    assert (await store.counts()).get("crm") is None, "no delivery was written"
    with fenced(current):
        assert (
            await store.commit_transform("shape", stored.seq, [Derived(stored, 0, b'"x"')], [], ["crm"]) == 1
        )
    assert await store.cursor("shape") == stored.seq
    assert event_id


async def test_poll_state_and_alert_states_are_fenced_too(
    store: PostgresStore, coordination: PostgresCoordination
) -> None:
    stale, current = await _taken_over(coordination, "poll.orders")
    with fenced(stale), pytest.raises(LeaseLost):
        await store.save_poll_state("orders", PollState(next_url="http://x/2"))
    assert (await store.load_poll_state("orders")).next_url is None
    with fenced(current):
        await store.save_poll_state("orders", PollState(next_url="http://x/2"))
    assert (await store.load_poll_state("orders")).next_url == "http://x/2"
    stale, _ = await _taken_over(coordination, "alerter")
    with fenced(stale), pytest.raises(LeaseLost):
        await store.save_alert_states({"r": AlertState(state="firing", since=1.0)}, frozenset({"r"}))
    assert await store.load_alert_states() == {}


async def test_a_refused_commit_fails_alone_in_its_group(
    store: PostgresStore, coordination: PostgresCoordination
) -> None:
    """Ingest committed in the same group as a stale commit is not held back by it."""
    stale, _ = await _taken_over(coordination, "poll.orders")
    results: list[object] = []

    async def stale_save() -> None:
        with fenced(stale):
            try:
                await store.save_poll_state("orders", PollState(next_url="http://x/9"))
            except LeaseLost as exc:
                results.append(exc)

    async def ingest(n: int) -> None:
        results.append(
            await store.insert_events(
                [Incoming("hooks", msgspec.json.encode({"n": n}), None, ())], dedup_window=3600
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stale_save)
        for n in range(20):
            nursery.start_soon(ingest, n)
    assert sum(isinstance(r, LeaseLost) for r in results) == 1
    assert len(await store.read_events(["hooks"], 0, 100)) == 20


async def test_without_a_fence_nothing_is_checked(store: PostgresStore) -> None:
    await store.save_poll_state("orders", PollState(next_url="http://x/3"))  # no lease table needed
    assert (await store.load_poll_state("orders")).next_url == "http://x/3"
