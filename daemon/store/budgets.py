"""The store's interface for cluster-wide rate budgets (issue 15): what a node asks the database.

On SQLite (one node) there is nothing to share and no backend: `daemon.limits.ratelimit` keeps
each budget's token bucket in memory. With several nodes on one PostgreSQL database, each
`[rate_limits.NAME]` budget is one row (`daemon.store.pg_budgets`), a token bucket kept on the
database's clock, from which every node takes permits in small batches.

Guarantees a backend gives:
    `take` grants at most `want` permits, each usable from a moment the shared bucket holds it:
    over any interval of length T the permits that become usable, for all nodes together, are at
    most `burst + rate_per_s * T`. A budget under a server's `Retry-After` (`block`) grants nothing
    until then, to any node. Both are one round trip each, timed by the database's clock, so the
    nodes' clocks may disagree.
    A call that fails raises `StoreUnavailable` and granted nothing that the caller will use:
    the limiter then grants nothing either (fails closed; see docs/limits.md).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol


class Grant(NamedTuple):
    """What one `take` got: `granted` permits (0..want), from when they may be used and, when 0,
    how long until one may be had."""

    granted: int
    start_in_s: float
    """Seconds until the granted permits may be used: a grant may reserve permits the bucket has
    not refilled yet (at most a fraction of a second ahead), so that callers queue, not race."""
    next_in_s: float
    """Seconds until the bucket holds a whole permit again (0 when it does now)."""
    blocked_for_s: float
    """Seconds the budget stays blocked by a server's `Retry-After` or reset (0 when it is not)."""


class Budgets(Protocol):
    """Shared token buckets by budget name. Fails fast: `StoreUnavailable` on any database error."""

    round_trips: int
    """Calls that reached the database (for `ferry ctl status` and the benches)."""

    async def take(self, name: str, want: int, rate_per_s: float, burst: int) -> Grant:
        """Take up to `want` permits of budget `name` (created full on first use, with this rate)."""
        ...

    async def block(self, name: str, pause_s: float, rate_per_s: float, burst: int) -> None:
        """Grant nothing of `name` to any node for `pause_s` seconds from now (database time).

        Never shortens an earlier block; when the block ends the bucket starts from one permit.
        """
        ...

    async def aclose(self) -> None:
        """Close the connection; further calls raise `StoreUnavailable`."""
        ...
