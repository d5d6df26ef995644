"""Cross-node wake-ups, the message: what a commit tells the other nodes, and how they read it.

A store's `Signal`s are in-process: a commit on node A wakes A's transforms and sinks only. On a
shared PostgreSQL store the transaction that commits work for a consumer (events for a transform,
deliveries for a sink, a retried dead letter, a replay) therefore also runs
`pg_notify('ferry_wake', '<node>\\t<consumer>,<consumer>…')` (`announce`, called by the engine
before the commit, sent in the group's pipeline: no extra round trip). PostgreSQL delivers it to
every listening session when, and only if, the transaction commits; each node's `WakeListener`
(`daemon.store.postgres.listener`) fires the named consumers' signals there.
"""

from __future__ import annotations

from typing import Any

import psycopg

CHANNEL = "ferry_wake"
ALL = "*"
"""The payload's consumer list meaning "every consumer" (a list too long for one notification)."""
MAX_PAYLOAD = 7_900
"""PostgreSQL refuses notification payloads of 8,000 bytes or more."""


def announce(conn: psycopg.Connection[Any], node: str, consumers: set[str]) -> None:
    """Inside a transaction: on its commit, tell every listening node to wake `consumers`."""
    payload = f"{node}\t{','.join(sorted(consumers))}"
    if len(payload.encode()) > MAX_PAYLOAD:
        payload = f"{node}\t{ALL}"
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


def parse(payload: str, node: str) -> frozenset[str] | None:
    """The consumers a notification names: empty when it is this node's own (or malformed),
    None when it names all of them."""
    sender, _, names = payload.partition("\t")
    if sender == node or not names:
        return frozenset()
    if names == ALL:
        return None
    return frozenset(name for name in names.split(",") if name)


__all__ = ["ALL", "CHANNEL", "MAX_PAYLOAD", "announce", "parse"]
