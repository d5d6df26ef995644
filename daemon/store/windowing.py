"""Tumbling windows of an aggregating transform, in memory: which window each output joins.

Backend-neutral (no I/O, no clock reads): `daemon.store.windows` (SQLite) and
`daemon.store.postgres` store the same `Window`/`Joined`/`Emitted` rows; the model and the
durability of the two commits are described in `daemon.store.windows`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple


@dataclass
class Window:
    """One window as the actor tracks it (the store holds the same, durably)."""

    id: int
    key: str
    opened_at: float
    """Wall-clock time its first event joined (stored: survives restarts)."""
    deadline: float | None
    """When it closes by age, on trio's clock (None: it closes only by count)."""
    size: int = 0


class Joined(NamedTuple):
    """One output placed in a window: the `window_events` row to store."""

    window: int
    n: int
    id: str
    payload: bytes
    trace: str | None


class Windows:
    """The open and closed-but-not-emitted windows of one transform (pure: no I/O, no clock reads)."""

    def __init__(self, max_events: int | None, max_age: float | None) -> None:
        self.max_events = max_events
        self.max_age = max_age
        self.open: dict[str, Window] = {}
        """Open windows by group key."""
        self.closed: list[Window] = []
        """Closed windows waiting to be emitted, in the order they closed."""
        self._next_id = 1

    def restore(self, stored: Iterable[tuple[int, str, float, int]], clock: float, wall: float) -> None:
        """Rebuild from the store's rows (id, key, opened_at, size) at start, oldest first.

        A window's remaining age counts from its stored `opened_at` on the wall clock; one that
        is full or past its age closes at once.
        """
        self.open.clear()
        self.closed.clear()
        for window_id, key, opened_at, size in stored:
            deadline = None if self.max_age is None else clock + max(0.0, self.max_age - (wall - opened_at))
            window = Window(window_id, key, opened_at, deadline, size)
            self._next_id = max(self._next_id, window_id + 1)
            if key in self.open:  # an older window of this key never closed: close it now
                self.closed.append(self.open.pop(key))
            if self.max_events is not None and size >= self.max_events:
                self.closed.append(window)
            else:
                self.open[key] = window
        self.expire(clock)

    def join(self, key: str, clock: float, wall: float) -> tuple[Window, int]:
        """Place one output of group `key`: its window and its position in it."""
        window = self.open.get(key)
        if window is None:
            deadline = None if self.max_age is None else clock + self.max_age
            window = self.open[key] = Window(self._next_id, key, wall, deadline)
            self._next_id += 1
        n = window.size
        window.size += 1
        if self.max_events is not None and window.size >= self.max_events:
            self.closed.append(self.open.pop(key))
        return window, n

    def expire(self, clock: float) -> None:
        """Close every open window whose deadline has come."""
        for key in [key for key, w in self.open.items() if w.deadline is not None and w.deadline <= clock]:
            self.closed.append(self.open.pop(key))

    def close_all(self) -> None:
        """Close every open window (oldest first), as at the end of `ferry test`'s inputs."""
        self.closed.extend(sorted(self.open.values(), key=lambda w: w.id))
        self.open.clear()

    def next_deadline(self) -> float | None:
        """The earliest deadline of an open window (trio clock), or None."""
        deadlines = [w.deadline for w in self.open.values() if w.deadline is not None]
        return min(deadlines) if deadlines else None

    def take_closed(self) -> list[Window]:
        closed, self.closed = self.closed, []
        return closed


class Emitted(NamedTuple):
    """A closed window's result: the event to store (None: `reduce` gave nothing) or its failure."""

    window: int
    id: str
    payload: bytes | None
    trace: str | None
    sinks: Sequence[str]
    error: str | None = None
    contents: bytes = b""
