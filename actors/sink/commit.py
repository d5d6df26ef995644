"""Group commit of a sink's outcomes: attempts that finish close together share one store request.

Why:
    A sink without batching finishes one delivery per request. Committing each outcome in its
    own store request, and counting and logging it alone, cost more CPU than the request
    itself (docs/performance.md, "Session 3: per-event delivery"). The workers hand their judged
    outcomes to one `OutcomeCommitter`; it commits everything handed in since its last commit
    in one store request, then runs the sink's bookkeeping (counters, taps, outcome log lines)
    once for the lot.

Delivery:
    `commit()` returns only once the transaction holding its outcomes has committed (or raises
    what the store raised). Until then the deliveries are pending in the store and in flight in
    the sink, so a crash (kill -9) while outcomes wait here leaves them pending: they are sent
    again under the same idempotency key. Outcomes commit in the order they were handed in.

Latency:
    No timer: an idle committer commits at once. While one commit is in the store, newly
    finished attempts gather for the next, so the group grows with the store's commit time
    (an fsync), not with a wait chosen here.

Errors:
    A store outage is waited out (`Outbox.record_outcomes` waits it out). If recording the group raises
    (a bug, a constraint), each entry is committed alone so that only the failing one's worker
    gets the error, as the store's own group commit does.

Cancellation and shutdown:
    A worker cancelled while it waits stops waiting; its outcomes still go out with the group
    (as with any store operation). `close()` once the workers have returned: `run` commits what is
    left and returns. Cancelled itself, `run` answers nobody: the waiting workers are in the
    same cancelled scope, and their deliveries stay pending.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import final

import trio

from daemon.errors import DeliveryError
from daemon.store.api import Attempt, Outbox
from daemon.store.ordering import Ordering
from daemon.store.outbox import Due, Outcomes

Recorder = Callable[[Sequence[Attempt], Sequence[str]], Awaitable[None]]
"""Commits attempts' outcomes in one transaction, then wakes the named consumers."""


def recorder(store: Outbox, ordering: Ordering | None) -> Recorder:
    """`store.record_outcomes`, with the sink's `ordering` (None: the sink does not order)."""

    async def record(attempts: Sequence[Attempt], wake: Sequence[str]) -> None:
        await store.record_outcomes(attempts, ordering=ordering, wake=wake)

    return record


@dataclass(slots=True, eq=False)
class Finished:
    """One judged attempt waiting for its outcomes to commit."""

    batch: Sequence[Due]
    outcomes: Outcomes
    error: DeliveryError | None
    latency: float
    response: str | None
    failure: BaseException | None = field(default=None)
    """What committing raised, for this entry's worker to re-raise."""


@final
class OutcomeCommitter:
    """Commits `Finished` attempts in groups; see the module docstring.

    `record(attempts, wake)` commits attempts' outcomes in one transaction (`recorder`);
    `wake(entries)` names the consumers to wake after the commit; `settle(entries)` runs after
    every try, committed or not; `committed(entries)` runs once for the entries that committed,
    before their workers resume.
    """

    def __init__(
        self,
        record: Recorder,
        *,
        wake: Callable[[Sequence[Finished]], Sequence[str]],
        settle: Callable[[Sequence[Finished]], None],
        committed: Callable[[Sequence[Finished]], None],
    ) -> None:
        self._record = record
        self._wake = wake
        self._settle = settle
        self._committed = committed
        self._pending: list[Finished] = []
        self._done = trio.Event()  # set when the group being gathered has been handled
        self._ready = trio.Event()  # set when there is something to commit, or on close
        self._closed = False
        self.groups = 0
        self.entries = 0

    def __repr__(self) -> str:
        return f"<OutcomeCommitter [waiting: {len(self._pending)}, {self.entries} in {self.groups} commits]>"

    async def commit(self, entry: Finished) -> None:
        """Hand `entry` in; return once its outcomes have committed (raise what committing raised)."""
        self._pending.append(entry)
        done = self._done
        self._ready.set()
        await done.wait()
        if entry.failure is not None:
            raise entry.failure

    def close(self) -> None:
        """No more entries: `run` commits what is left and returns."""
        self._closed = True
        self._ready.set()

    async def run(self) -> None:
        while True:
            if not self._pending:
                if self._closed:
                    return
                await self._ready.wait()
                self._ready = trio.Event()
                continue
            entries, self._pending = self._pending, []
            done, self._done = self._done, trio.Event()
            await self._write(entries)
            done.set()

    async def _write(self, entries: list[Finished]) -> None:
        record, wake = self._record, self._wake(entries)
        try:
            try:
                await record([(e.outcomes, e.latency, e.response) for e in entries], wake)
            except Exception as exc:
                if len(entries) == 1:
                    entries[0].failure = exc
                else:
                    for entry in entries:
                        try:
                            await record([(entry.outcomes, entry.latency, entry.response)], wake)
                        except Exception as one:
                            entry.failure = one
        finally:
            self._settle(entries)
        self.groups += 1
        self.entries += len(entries)
        committed = [entry for entry in entries if entry.failure is None]
        if committed:
            self._committed(committed)
