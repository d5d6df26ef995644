"""The shared budget row on a real PostgreSQL server: grants, the bucket's bound, blocks, refusals."""

from __future__ import annotations

import socket

import psycopg
import pytest
import trio

from daemon.errors import StoreUnavailable
from daemon.store.pg_budgets import AHEAD_S, PgBudgets
from tests.postgres import ferry_database, postgres_url

__all__ = ["ferry_database", "postgres_url"]


async def test_a_new_budget_starts_full_then_reserves_at_most_ahead_s(ferry_database: str) -> None:
    """4 per second, burst 3: the burst now, then the one permit the next AHEAD_S (0.25 s) pays.

    That holds for three takes within AHEAD_S (a later one finds that permit paid, and the next
    one reservable): a run the machine stalled for longer is not evidence either way, so it is
    tried again on a fresh budget. The assertions judge only a run that was quick enough."""
    assert AHEAD_S == 0.25
    budgets = PgBudgets(ferry_database)
    try:
        for tries in range(1, 21):
            name = f"api-{tries}"
            began = trio.current_time()
            first = await budgets.take(name, 5, 4.0, 3)
            ahead = await budgets.take(name, 5, 4.0, 3)
            empty = await budgets.take(name, 5, 4.0, 3)  # the next one is due beyond AHEAD_S
            if trio.current_time() - began < AHEAD_S:
                break
        else:
            pytest.fail("no three takes within AHEAD_S in 20 tries")
        assert first == (3, 0.0, 0.0, 0.0)  # the burst, usable now
        assert ahead.granted == 1
        assert 0 < ahead.start_in_s <= 0.25  # when the refill has paid for it
        assert empty.granted == 0
        assert 0 < empty.next_in_s <= 0.25
        assert budgets.round_trips == 3 * tries
    finally:
        await budgets.aclose()


async def test_two_connections_never_get_more_than_the_bucket_holds(ferry_database: str) -> None:
    """20 per second, burst 5, two "nodes" asking as fast as they can for 1.5 s: at most 5 + 30
    permits usable by the end (reserved ones count from when they may start)."""
    nodes = [PgBudgets(ferry_database), PgBudgets(ferry_database)]
    got = [0, 0]
    began = trio.current_time()

    async def ask(i: int) -> None:
        while (now := trio.current_time()) - began < 1.5:
            grant = await nodes[i].take("api", 4, 20.0, 5)
            if now + grant.start_in_s <= began + 1.5:
                got[i] += grant.granted
            await trio.sleep(grant.next_in_s)

    try:
        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(ask, i)
        elapsed = trio.current_time() - began
    finally:
        for node in nodes:
            await node.aclose()
    assert sum(got) <= 5 + 20 * elapsed + 1  # the asker's clock read a little before the row's
    assert sum(got) >= 20  # it grants, and to both
    assert min(got) > 0


async def test_a_block_holds_back_every_connection_and_is_never_shortened(ferry_database: str) -> None:
    one, other = PgBudgets(ferry_database), PgBudgets(ferry_database)
    try:
        await one.take("api", 1, 100.0, 10)
        await one.block("api", 30.0, 100.0, 10)
        await one.block("api", 1.0, 100.0, 10)  # shorter: changes nothing
        seen = await other.take("api", 5, 100.0, 10)
        assert seen.granted == 0
        assert 29 < seen.blocked_for_s <= 30
        assert seen.next_in_s >= seen.blocked_for_s
        await other.block("api", 0.0, 100.0, 10)  # nothing to do
        await other.block("fresh", 0.2, 100.0, 10)  # a block may create the row
        assert (await other.take("fresh", 1, 100.0, 10)).granted == 0
    finally:
        await one.aclose()
        await other.aclose()


async def test_after_a_block_the_bucket_starts_from_one_permit(ferry_database: str) -> None:
    budgets = PgBudgets(ferry_database)
    try:
        await budgets.block("api", 0.2, 1.0, 10)
        with trio.fail_after(5):
            while (grant := await budgets.take("api", 10, 1.0, 10)).granted == 0:
                await trio.sleep(grant.next_in_s)
        assert grant.granted == 1
    finally:
        await budgets.aclose()


async def test_a_smaller_burst_after_a_reload_caps_what_is_there(ferry_database: str) -> None:
    budgets = PgBudgets(ferry_database)
    try:
        assert (await budgets.take("api", 1, 1.0, 100)).granted == 1  # 99 left
        assert (await budgets.take("api", 50, 1.0, 2)).granted == 2  # capped to the new burst
    finally:
        await budgets.aclose()


async def test_a_locked_table_times_out_as_unavailable_and_recovers(ferry_database: str) -> None:
    budgets = PgBudgets(ferry_database, timeout=0.3)
    try:
        await budgets.take("api", 1, 10.0, 1)
        with psycopg.connect(ferry_database) as locker:
            locker.execute("LOCK TABLE ferry_rate_budgets IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(StoreUnavailable, match="timeout"):
                await budgets.take("api", 1, 10.0, 1)
        assert budgets.errors == 1
        with trio.fail_after(5):
            while (grant := await budgets.take("api", 1, 10.0, 1)).granted == 0:
                await trio.sleep(grant.next_in_s)
    finally:
        await budgets.aclose()


async def test_an_unreachable_server_is_unavailable_not_a_crash() -> None:
    budgets = PgBudgets(closed_port_url(), timeout=0.5)
    with pytest.raises(StoreUnavailable, match="rate budget"):
        await budgets.take("api", 1, 10.0, 1)
    assert (budgets.errors, budgets.round_trips) == (1, 0)


async def test_bad_arguments_and_a_closed_connection_are_refused(ferry_database: str) -> None:
    with pytest.raises(ValueError, match="timeout"):
        PgBudgets(ferry_database, timeout=0)
    budgets = PgBudgets(ferry_database)
    for want, rate, burst in [(0, 1.0, 1), (1, 0.0, 1), (1, -1.0, 1), (1, 1.0, 0)]:
        with pytest.raises(ValueError, match="positive"):
            await budgets.take("api", want, rate, burst)
    await budgets.aclose()
    with pytest.raises(StoreUnavailable, match="closed"):
        await budgets.take("api", 1, 1.0, 1)
    assert "closed" in repr(budgets)


def closed_port_url() -> str:
    """A PostgreSQL URL on a 127.0.0.1 port nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"postgresql://127.0.0.1:{port}/nothing"
