"""Claims between nodes sharing one PostgreSQL outbox: leases, outcomes by the holder, ordering."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import msgspec
import psycopg
import pytest
import trio
import trio.lowlevel

from daemon.config.sync import OrderingConfig
from daemon.store.keying import Ordering
from daemon.store.postgres.store import PostgresStore
from daemon.store.types import Incoming, Outcomes
from tests.postgres import postgres_url, two_nodes

__all__ = ["postgres_url"]

FAR = 2e10


@pytest.fixture
async def nodes(postgres_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two nodes on one database; their leases last 1 s."""
    async with two_nodes(postgres_url, lease=1.0) as pair:
        yield pair


async def ingest(store: PostgresStore, *bodies: object) -> list[str]:
    results = await store.insert_events(
        [Incoming("hooks", msgspec.json.encode(body), None, ("crm",)) for body in bodies], dedup_window=60
    )
    return [event_id for event_id, _ in results]


async def test_a_claimed_delivery_is_not_handed_to_another_node_while_its_lease_holds(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    ids = [f"{event_id}.crm" for event_id in await ingest(a, 1, 2, 3)]
    first = await a.due_deliveries("crm", FAR, 2)
    assert [d.id for d in first] == ids[:2]
    assert [d.id for d in await b.due_deliveries("crm", FAR, 10)] == ids[2:]
    # A node fetching again gets its own claims back (the sink keeps what it holds), renewed.
    assert [d.id for d in await a.due_deliveries("crm", FAR, 10)] == ids[:2]
    assert [d.id for d in await b.due_deliveries("crm", FAR, 10)] == ids[2:]


async def test_an_expired_lease_is_claimable_and_only_the_holder_records_an_outcome(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    await ingest(a, 1)
    (due,) = await a.due_deliveries("crm", FAR, 10)
    assert await b.due_deliveries("crm", FAR, 10) == []
    began = time.monotonic()
    with trio.fail_after(10):
        while not (taken := await b.due_deliveries("crm", FAR, 10)):
            await trio.sleep(0.05)
    assert time.monotonic() - began > 0.5  # not before the lease ran out
    assert [d.id for d in taken] == [due.id]
    # node-a lost it: its outcome changes nothing; node-b's is recorded.
    await a.record_outcomes([(Outcomes([(due.rowid, 200)], [], []), 0.01, "ok")])
    assert (await a.counts())["crm"] == {"pending": 1, "delivered": 0, "dead": 0}
    await b.record_outcomes([(Outcomes([(due.rowid, 201)], [], []), 0.01, "ok")])
    assert (await a.counts())["crm"] == {"pending": 0, "delivered": 1, "dead": 0}


async def test_a_node_whose_clock_runs_ahead_does_not_take_another_nodes_claims_early(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with two_nodes(postgres_url, lease=60.0) as (a, b):
        await ingest(a, 1, 2)
        held = await a.due_deliveries("crm", FAR, 10)
        assert len(held) == 2
        # Every node clock in this process now reads two minutes ahead (node-b's, as if skewed):
        # lease expiry is the database's clock, so node-a's one-minute claims still hold.
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 120)
        assert await b.due_deliveries("crm", FAR, 10) == []
        # node-a fetching with its clock ahead keeps what it holds.
        assert [d.rowid for d in await a.due_deliveries("crm", FAR, 10)] == [d.rowid for d in held]


async def test_a_node_renews_only_the_claims_no_other_node_took_even_after_they_ran_out(
    nodes: tuple[PostgresStore, PostgresStore], postgres_url: str
) -> None:
    a, b = nodes
    await ingest(a, 1, 2)
    first, second = await a.due_deliveries("crm", FAR, 10)
    assert await a.renew_claims("crm", [first.rowid]) == {first.rowid}
    both = {first.rowid, second.rowid}
    taken: set[int] = set()
    with trio.fail_after(10):  # node-a's leases (1 s) run out; node-b claims each once it is free
        while taken != both:
            taken |= {d.rowid for d in await b.due_deliveries("crm", FAR, 10)}
            await trio.sleep(0.05)
    assert await a.renew_claims("crm", list(both)) == set(), "node-b's now"
    assert await b.renew_claims("crm", list(both)) == both

    def leases() -> dict[int, tuple[str, float, bool]]:
        """Each row's lease: (owner, until, whether it holds now), on the database's clock."""
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT rowid, lease_owner, lease_until, lease_until >= extract(epoch FROM now()) "
                "FROM deliveries"
            ).fetchall()
        return {rowid: (owner, until, live) for rowid, owner, until, live in rows}

    # Run out with nobody taking it: the claim is still node-b's to renew (no other node has it).
    with trio.fail_after(10):
        while any(live for _, _, live in leases().values()):
            await trio.sleep(0.05)
    lapsed = leases()
    assert await b.renew_claims("crm", [first.rowid]) == {first.rowid}
    renewed = leases()
    assert renewed[first.rowid][0] == "node-b"
    assert renewed[first.rowid][1] > lapsed[first.rowid][1], "a new lease from the renewal"
    assert renewed[second.rowid] == lapsed[second.rowid], "the other row untouched"


async def test_a_retried_delivery_is_free_for_any_node_once_due(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    await ingest(a, 1)
    (due,) = await a.due_deliveries("crm", FAR, 10)
    at = time.time() + 0.2
    await a.record_outcomes([(Outcomes([], [(due.rowid, at, 503, "HTTP 503")], []), None, None)])
    assert [d.id for d in await b.due_deliveries("crm", at + 0.1, 10)] == [due.id]


async def test_each_keys_head_is_held_by_one_node_at_a_time(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    ordering = Ordering(OrderingConfig(key=".k", version=".v", compare="number"))
    await ingest(a, {"k": "x", "v": 1}, {"k": "x", "v": 2}, {"k": "y", "v": 1})
    fetched = await a.due_ordered(ordering, "crm", FAR, 10)
    heads = {msgspec.json.decode(d.payload)["k"]: d for d in fetched.rows}
    assert {k: msgspec.json.decode(d.payload)["v"] for k, d in heads.items()} == {"x": 1, "y": 1}
    # node-b sees no head: x's and y's are node-a's, and x@2 waits behind x@1.
    assert (await b.due_ordered(ordering, "crm", FAR, 10)).rows == []
    await a.record_outcomes([(Outcomes([(heads["x"].rowid, 200)], [], []), None, None)], ordering=ordering)
    (next_x,) = (await b.due_ordered(ordering, "crm", FAR, 10)).rows
    assert msgspec.json.decode(next_x.payload) == {"k": "x", "v": 2}


async def test_two_nodes_ingesting_the_same_key_store_it_once(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    results: list[tuple[str, bool]] = []

    async def send(store: PostgresStore) -> None:
        results.extend(
            await store.insert_events(
                [Incoming("hooks", b"{}", None, ("crm",), dedup_key=f"k{n}") for n in range(50)],
                dedup_window=60,
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, a)
        nursery.start_soon(send, b)
    assert sum(not duplicate for _, duplicate in results) == 50
    assert len(await a.read_events(["hooks"], 0, 1000)) == 50


async def test_events_from_several_nodes_commit_in_seq_order(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    seen: list[int] = []
    position = 0

    async def send(store: PostgresStore) -> None:
        for n in range(40):
            await ingest(store, n)

    async def read() -> None:
        nonlocal position
        while len(seen) < 80:
            for event in await a.read_events(["hooks"], position, 1000):
                seen.append(event.seq)
                position = event.seq
            await trio.lowlevel.checkpoint()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, a)
            nursery.start_soon(send, b)
            nursery.start_soon(read)
    # A cursor moving as events appear saw every one: none committed behind it.
    assert len(seen) == 80
    assert seen == sorted(seen)


async def test_a_sink_head_counts_the_incarnations_of_each_node_alone(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    await ingest(a, 1)
    # Two nodes starting their sinks twice each: four starts, but no node crashed on the head
    # more than twice, so nothing is quarantined (quarantine_after = 2).
    for store in (a, b, a, b):
        assert await store.quarantine_head("crm", 2) is None
    found = await a.quarantine_head("crm", 2)
    assert found is not None
    assert found[1] == 2
