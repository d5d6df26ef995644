"""Cross-node wake-ups on a real PostgreSQL server: what a commit announces, and who hears it.

`wake.announce` inside a transaction reaches a listening session only when it commits;
`WakeListener` hands the trio loop the names other nodes announced, never its own, wakes every
consumer when it (re)connects, and keeps listening across a connection the server ended.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import trio

from daemon.store.postgres.listener import WakeListener
from daemon.store.postgres.wake import ALL, CHANNEL, MAX_PAYLOAD, announce, parse
from tests.postgres import postgres_url

__all__ = ["postgres_url"]


def test_a_payload_names_the_sender_and_its_consumers_and_is_read_back() -> None:
    assert parse("node-b\tcrm,shape", "node-a") == frozenset({"crm", "shape"})
    assert parse("node-a\tcrm,shape", "node-a") == frozenset(), "a node's own commits are woken locally"
    assert parse(f"node-b\t{ALL}", "node-a") is None


@pytest.mark.parametrize("payload", ["", "node-b", "node-b\t", "\t", "node-b\t,,"])
def test_a_malformed_payload_wakes_nobody(payload: str) -> None:
    assert parse(payload, "node-a") == frozenset()


def _listening(url: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(f"LISTEN {CHANNEL}")
    return conn


def test_an_announcement_is_heard_when_its_transaction_commits_and_never_when_it_rolls_back(
    postgres_url: str,
) -> None:
    with _listening(postgres_url) as ear, psycopg.connect(postgres_url) as conn:
        announce(conn, "node-a", {"shape"})
        conn.rollback()
        announce(conn, "node-a", {"crm", "shape"})
        assert not list(ear.notifies(timeout=0.2)), "nothing is sent before the commit"
        conn.commit()
        heard = [note.payload for note in ear.notifies(timeout=5, stop_after=1)]
    assert heard == ["node-a\tcrm,shape"]


def test_a_list_too_long_for_one_notification_wakes_every_consumer(postgres_url: str) -> None:
    many = {f"sink_{n:05}" for n in range(2_000)}  # ~22 kB of names
    with _listening(postgres_url) as ear, psycopg.connect(postgres_url) as conn:
        announce(conn, "node-a", many)
        conn.commit()
        heard = [note.payload for note in ear.notifies(timeout=5, stop_after=1)]
    assert heard == [f"node-a\t{ALL}"]
    assert len(heard[0]) < MAX_PAYLOAD
    assert parse(heard[0], "node-b") is None


async def _until(check: Callable[[], bool], within: float = 15.0) -> None:
    with trio.fail_after(within):
        while not check():
            await trio.sleep(0.02)


def _notify(url: str, payload: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


async def test_the_listener_wakes_what_other_nodes_name_and_all_on_every_connection(
    postgres_url: str,
) -> None:
    woken: list[frozenset[str] | None] = []
    listener = WakeListener(postgres_url, node="node-a", wake=woken.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run)
        await _until(lambda: woken == [None])  # connected: it cannot know what it missed
        assert listener.connected
        assert listener.connections == 1

        await trio.to_thread.run_sync(_notify, postgres_url, "node-a\tshape")  # its own: skipped
        await trio.to_thread.run_sync(_notify, postgres_url, "node-b\tcrm")
        await _until(lambda: len(woken) == 2)
        assert woken[1] == frozenset({"crm"})
        assert listener.heard == 1

        # The server ends the session: the listener opens another and wakes everyone once more.
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            cut = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s",
                ("ferry node-a wake",),
            ).fetchall()
        assert cut == [(True,)]
        await _until(lambda: listener.connections == 2 and listener.connected)
        await _until(lambda: len(woken) == 3)
        assert woken[2] is None
        await trio.to_thread.run_sync(_notify, postgres_url, "node-c\tshape,crm")
        await _until(lambda: len(woken) == 4)
        assert woken[3] == frozenset({"shape", "crm"})
        nursery.cancel_scope.cancel()
    assert not listener.connected, "cancelled: the thread closed its connection"


async def test_an_unreachable_database_is_retried_with_backoff_without_waking_anyone() -> None:
    woken: list[frozenset[str] | None] = []
    listener = WakeListener("postgresql://127.0.0.1:1/nothing", node="node-a", wake=woken.append)
    with trio.move_on_after(0.5):
        await listener.run()
    assert woken == []
    assert listener.connections == 0
    assert not listener.connected
