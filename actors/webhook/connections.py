"""The webhook listener's open connections, and which one gives way when they run out.

A listener holds at most `max_connections` connections. When they are all taken, a connection
that is only *waiting for its client* — idle between keep-alive requests, or still receiving a
request head or body — is worth less than a new one: the new one is admitted and the connection
that has been waiting longest is closed. So slow clients (slowloris, slow bodies) and piles of
idle connections cannot lock out a client that sends its request promptly; the only connections
never closed to make room are those whose request is being stored or answered. When every
connection is in that state, the new one is refused (503).

Resource handling: each admitted connection gets a `Slot` holding a cancel scope; closing a slot
cancels that connection's task, which then closes its socket. Bookkeeping is O(1) per request;
choosing the connection to close is one pass over the open ones, and happens only at the limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import final

import trio

__all__ = ["ConnectionTable", "Slot"]


@final
class Slot:
    """One admitted connection: `waiting_since` is set while it waits for its client."""

    __slots__ = ("evicted", "scope", "waiting_since")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.waiting_since: float | None = None
        self.evicted = False

    def waiting(self) -> None:
        """From now on the connection waits for its client (idle, head or body on the way)."""
        if self.waiting_since is None:
            self.waiting_since = trio.current_time()

    def busy(self) -> bool:
        """The request has arrived whole: storing and answering it is never cut short for room.

        False if the connection was closed to make room meanwhile (its cancellation is pending):
        the request must then be dropped unanswered, before anything is stored.
        """
        self.waiting_since = None
        return not self.evicted

    def __repr__(self) -> str:
        state = "evicted" if self.evicted else "busy" if self.waiting_since is None else "waiting"
        return f"<Slot {state}>"


@final
class ConnectionTable:
    """At most `limit` slots; `admit()` makes room by closing the longest-waiting one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots: dict[Slot, None] = {}  # insertion-ordered set
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __repr__(self) -> str:
        return f"<ConnectionTable [{len(self._slots)}/{self.limit} open, {self.evictions} evicted]>"

    @contextmanager
    def admit(self) -> Iterator[Slot | None]:
        """A slot for a new connection (None: every connection is busy, refuse this one).

        At the limit, the connection waiting longest for its client is closed to make room; it
        leaves the table at once, so the count never exceeds the limit.
        """
        if len(self._slots) >= self.limit and not self._evict():
            yield None
            return
        slot = Slot()
        slot.waiting()
        self._slots[slot] = None
        try:
            yield slot
        finally:
            self._slots.pop(slot, None)

    def _evict(self) -> bool:
        oldest: Slot | None = None
        for slot in self._slots:
            since = slot.waiting_since
            if since is not None and (oldest is None or since < oldest.waiting_since):  # type: ignore[operator]
                oldest = slot
        if oldest is None:
            return False
        oldest.evicted = True
        oldest.scope.cancel()
        del self._slots[oldest]
        self.evictions += 1
        return True
