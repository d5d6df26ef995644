"""What a sink sends next: its fetcher reads due rows into the workers' channel, and tracks them.

Part of `actors.sink.sink.Sink` (its "Backpressure and memory" and "Pausing" guarantees are
kept here): one task reads the stage's due deliveries, at most `ahead` (concurrency x batch
size) beyond those in flight, into the bounded channel the workers read.

In flight:
    A row handed to a worker stays in `inflight` until its outcome has committed (or the worker
    handed it back unsent) *and* a later fetch has begun: a fetch issued before that commit may
    still return it as pending, and it must not be sent twice by one incarnation.

Claims (a store shared by several nodes):
    A row a fetch returned stays this node's for `store.claim_lease` seconds from the fetch's
    start; every fetch returns (and so renews) the rows this node holds, and stamps them.
    `reclaim` is what a worker calls before it sends: the rows whose stamp is too old to
    outlast the request (`within` s) have their claim renewed first, and those another node
    claimed meanwhile (the lease ran out while they waited, e.g. for a rate-limit permit) are
    dropped unsent: that node sends them. So no two nodes send a delivery at once.

Sleeping:
    With nothing more to fetch, the fetcher waits for the stage's `Signal` (fired after every
    commit that adds or reschedules its rows) or for the earliest pending row scheduled later.
    That time is asked of the store once (`next_due_after`) and then kept: a row of this stage is
    only ever scheduled in the future by this sink's own retry outcomes, which `retry_at` folds
    in, so the store is asked again only once the time kept has come (or at a restart). Rows
    due now arrive with a signal. An idle round costs one store request (the fetch), not two.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import final

import trio

from actors.sink.quarantine import quarantine_head
from daemon.store.api import Outbox, Signal
from daemon.store.ordering import Fetched, Ordering
from daemon.store.outbox import Due

log = logging.getLogger("ferry.sink")

IDLE_WAIT = 3600.0
"""The longest sleep with nothing scheduled: every row due now comes with a signal."""


@final
class Fetcher:
    """Reads stage `name`'s due rows into the workers' channel; see the module docstring.

    `running()` is False once the sink stops; `paused()` while it is paused, and
    `wait_resumed()` returns when it is resumed or stopped. `dropped(fetched)` counts what an
    ordered fetch found stale or unkeyable.
    """

    def __init__(
        self,
        name: str,
        store: Outbox,
        signal: Signal,
        *,
        ordering: Ordering | None,
        quarantine_after: int,
        clock: Callable[[], float],
        running: Callable[[], bool],
        paused: Callable[[], bool],
        wait_resumed: Callable[[], Awaitable[None]],
        dropped: Callable[[Fetched], None],
    ) -> None:
        self.name = name
        self._store = store
        self._signal = signal
        self._ordering = ordering
        self._quarantine_after = quarantine_after
        self._clock = clock
        self._running = running
        self._paused = paused
        self._wait_resumed = wait_resumed
        self._dropped = dropped
        self.inflight: set[int] = set()
        # Rows whose outcome has committed but which a fetch issued *before* that commit may
        # still return as pending; they leave `inflight` only once a later fetch has begun.
        self.settled: set[int] = set()
        self._later: float | None = None  # no later than the earliest row scheduled after now
        self._known = False  # whether `_later` covers the rows scheduled before this incarnation
        self._claim_lease = store.claim_lease
        self.claims_lapse = self._claim_lease is not None
        """Whether another node can take a row this one fetched (`reclaim` before sending)."""
        self._head_lock = trio.Lock()
        self.head_checked = ordering is not None  # sinks with ordering have no crash quarantine
        self.quarantined: set[int] = set()
        """Rows this incarnation's head check dead-lettered: a worker holding one drops it."""
        self._fetched_at: dict[int, float] = {}  # rowid -> start of the last fetch returning it
        self.lost = 0
        """Rows dropped unsent because another node had claimed them (`reclaim`)."""

    def reset(self) -> None:
        """A new incarnation: nothing in flight, and the next sleep asks the store again."""
        self.inflight.clear()
        self.settled.clear()
        self._fetched_at.clear()
        self.head_checked = self._ordering is not None
        self.quarantined.clear()
        self._later, self._known = None, False

    def settle(self, rowids: set[int] | list[int]) -> None:
        """These rows' outcomes committed (or they were handed back): they leave `inflight` at
        the next fetch."""
        self.settled.update(rowids)

    def retry_at(self, at: float) -> None:
        """A retry of this stage is scheduled at `at` (its outcome is committing or committed)."""
        if self._later is None or at < self._later:
            self._later = at

    @property
    def in_flight(self) -> int:
        return len(self.inflight - self.settled)

    async def run(self, channel: trio.MemorySendChannel[list[Due]], chunk: int, ahead: int) -> None:
        """Fetch until the sink stops; each `channel.send` carries one batch (`chunk` rows)."""
        store, name = self._store, self.name
        if self._ordering is None:  # the crash quarantine (actors.sink.quarantine)
            await self._suspect_alone(channel)
        while self._running():
            if self._paused():
                await self._wait_resumed()
                continue
            now = self._clock()
            started = trio.current_time()
            settled, self.settled = self.settled, set()
            self.inflight.difference_update(settled)
            limit = len(self.inflight) + ahead
            more = False
            if self._ordering is None:
                rows = await store.due_deliveries(name, now, limit)
            else:
                fetched = await store.due_ordered(self._ordering, name, now, limit)
                rows, more = fetched.rows, fetched.more
                if fetched.stale or fetched.dead:
                    self._dropped(fetched)
            inflight = self.inflight
            if self._claim_lease is not None:
                self._stamp(rows, settled, started)
            fresh = [row for row in rows if row.rowid not in inflight]
            inflight.update(row.rowid for row in fresh)
            # Chunks of one batch each: a channel op per batch, not per row.
            for start in range(0, len(fresh), chunk):
                await channel.send(fresh[start : start + chunk])
            if more or len(fresh) >= ahead:
                continue
            wake_at = await self._next_due(now)
            with trio.move_on_after(max(0.0, wake_at - self._clock()) if wake_at is not None else IDLE_WAIT):
                await self._signal.wait()

    async def check_head(self) -> None:
        """Before this incarnation's first send: record the stage's head, and dead-letter it if
        too many incarnations died with it (`actors.sink.quarantine`). Once per incarnation; the
        other workers wait for it."""
        async with self._head_lock:
            if self.head_checked:
                return
            found = await quarantine_head(self._store, self.name, self._quarantine_after)
            if found is not None:
                self.quarantined.add(found)
                self.settle([found])
            self.head_checked = True

    def _stamp(self, rows: list[Due], settled: set[int], started: float) -> None:
        fetched_at = self._fetched_at
        for rowid in settled:
            fetched_at.pop(rowid, None)
        for row in rows:
            fetched_at[row.rowid] = started

    async def reclaim(self, batch: list[Due], within: float) -> list[Due]:
        """The rows of `batch` this node may send now; see "Claims" in the module docstring."""
        lease = self._claim_lease
        if lease is None:
            return batch
        oldest = trio.current_time() - lease + within
        stale = [row.rowid for row in batch if self._fetched_at.get(row.rowid, -math.inf) < oldest]
        if not stale:
            return batch
        renewed_at = trio.current_time()
        held = await self._store.renew_claims(self.name, stale)
        for rowid in held:
            self._fetched_at[rowid] = renewed_at  # as if fetched now (the renewal gives more)
        lost = [rowid for rowid in stale if rowid not in held]
        if not lost:
            return batch
        self.lost += len(lost)
        self.settle(lost)
        log.info(
            "deliveries claimed by another node meanwhile; left to it",
            extra={"fields": {"sink": self.name, "count": len(lost)}},
        )
        gone = set(lost)
        return [row for row in batch if row.rowid not in gone]

    async def _next_due(self, now: float) -> float | None:
        """When the earliest row scheduled after `now` comes due (None: no such row), asking the
        store only when what is kept does not say (module docstring, "Sleeping")."""
        if self._known and (self._later is None or self._later > now):
            return self._later
        self._later = None  # retries scheduled while the store answers are folded in below
        queried = await self._store.next_due_after(self.name, now)
        later = self._later
        self._later = queried if later is None or (queried is not None and queried < later) else later
        self._known = True
        return self._later

    async def _suspect_alone(self, channel: trio.MemorySendChannel[list[Due]]) -> None:
        """When an incarnation before this one died with the same head delivery, send it alone and
        wait for its outcome before any other: a delivery that kills the process is then the head
        the next incarnation records, never an innocent one sent beside it whose outcome the death
        lost (and which would otherwise be quarantined in its place)."""
        recorded = await self._store.read_head(self.name)
        if recorded is None or recorded.attempts < 2 or self._paused():
            return
        rows = await self._store.due_deliveries(self.name, self._clock(), 1)
        if not rows or rows[0].rowid != recorded.head:
            return
        suspect = rows[0]
        self.inflight.add(suspect.rowid)
        await channel.send([suspect])
        while suspect.rowid not in self.settled and self._running():
            with trio.move_on_after(0.2):
                await self._signal.wait()


async def top_up(
    rows: list[Due], channel: trio.MemoryReceiveChannel[list[Due]], max_items: int, max_wait: float
) -> list[Due]:
    """`rows` and what the fetcher hands in on `channel` within `max_wait` (seconds), until there
    are `max_items` or the channel ends: a batching worker's fill. Rows beyond `max_items` may be
    among those returned (a hand-in is taken whole); the caller cuts the batch."""
    with trio.move_on_after(max_wait):
        while len(rows) < max_items:
            try:
                rows = rows + channel.receive_nowait()
            except trio.WouldBlock:
                try:
                    rows = rows + await channel.receive()
                except trio.EndOfChannel:
                    break
            except trio.EndOfChannel:
                break
    return rows
