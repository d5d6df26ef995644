"""Fencing tokens: a singleton's commits succeed only while its lease is current (cluster mode).

The wrapper that runs a singleton actor under its lease (`daemon.cluster.singleton`) sets the
lease's `Fence` in a context variable before it starts the actor; trio copies a task's context
into every task it spawns, so every store call the actor makes, from any of its tasks, carries
the fence of the acquisition it was started under. The backend's singleton commits (a
transform's cursor, a poll page, a window, the alert states) read `current()` where they are
called, in the actor's task, and run `check` first in the same transaction as their writes.

`check` locks the lease row `FOR KEY SHARE` and compares holder and token, with the expiry on
the database's clock: if another node took the lease (its token is higher) or it expired, the
commit raises `LeaseLost` and writes nothing. The row lock orders the commit against a
concurrent takeover, which locks the row `FOR UPDATE` (`daemon.store.leases`): either the commit
lands first and the new holder reads it back, or the takeover lands first and the commit is
refused. The holder's own renewals (an `UPDATE` of the expiry only) do not conflict with it, so
a node's commits never hold up its heartbeat.

With no fence set (SQLite, a single node; or an actor that is not a singleton) nothing is checked
and nothing is paid.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar

from daemon.errors import LeaseLost

T = TypeVar("T")


class Fence(NamedTuple):
    """One acquisition of a lease: its name, the node that holds it and its token."""

    name: str
    holder: str
    token: int


_current: contextvars.ContextVar[Fence | None] = contextvars.ContextVar("ferry_fence", default=None)


def current() -> Fence | None:
    """The fence of the singleton whose task is calling (None outside any)."""
    return _current.get()


@contextmanager
def fenced(fence: Fence) -> Iterator[None]:
    """Run the enclosed code (and every task it spawns) under `fence`."""
    reset = _current.set(fence)
    try:
        yield
    finally:
        _current.reset(reset)


CHECK = (
    "SELECT 1 FROM ferry_leases WHERE name = %s AND holder = %s AND token = %s "
    "AND expires_at > now() FOR KEY SHARE"
)


def check(cursor: Any, fence: Fence | None) -> None:
    """Inside a PostgreSQL transaction: raise `LeaseLost` unless `fence` is still current."""
    if fence is None:
        return
    if cursor.execute(CHECK, (fence.name, fence.holder, fence.token)).fetchone() is None:
        raise LeaseLost(f"lease {fence.name!r} (token {fence.token}) is no longer held by {fence.holder}")


def guarded(fn: Callable[[Any], T]) -> Callable[[Any], T]:
    """`fn(db)` preceded, in its own transaction, by the check of the calling task's fence.

    Call it in the store's async method (the singleton's task, where the fence is set), not on
    the writer thread: `daemon.store.operations` does, as PostgreSQL's `Functions.guarded`
    (`call_until_committed(functions.guarded(fn))`). Without a fence it
    returns `fn` itself. `db` is the PostgreSQL backend's `Db` (its psycopg connection in `.conn`).
    """
    fence = current()
    if fence is None:
        return fn

    def fenced_fn(db: Any) -> T:
        check(db.conn, fence)
        return fn(db)

    return fenced_fn


__all__ = ["CHECK", "Fence", "check", "current", "fenced", "guarded"]
