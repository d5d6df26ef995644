"""`[cluster]`: how the nodes sharing one PostgreSQL store coordinate (docs/cluster.md).

Read only when `[store] backend = "postgres"`; a SQLite store is one node that always holds every
lease, and these keys change nothing there. Like the other runtime sections, `[cluster]` cannot
change in a running process (a reload that changes it is refused).
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from daemon.config.base import Section, default
from daemon.config.units import Duration


class ClusterConfig(Section, frozen=True):
    """Node heartbeats, singleton leases and how fast a singleton fails over to another node."""

    heartbeat: Annotated[
        Duration,
        Meta(
            description="How often a node writes its heartbeat, renews the leases it holds, tries to take "
            "the free ones it wants and reads the cluster-wide pauses and drain (one transaction)."
        ),
    ] = default(Duration(1))
    lease_ttl: Annotated[
        Duration,
        Meta(
            description="How long a singleton's lease (a transform's cursor, a poll source, the alerter) "
            "lasts without renewal, on the database's clock. A node that dies loses its leases after at "
            "most this long; another node takes them at its next heartbeat, so failover takes at most "
            "`lease_ttl + heartbeat` (plus the actor's start). At least 3 heartbeats."
        ),
    ] = default(Duration(5))
    dead_after: Annotated[
        Duration,
        Meta(
            description="A node whose last heartbeat is older than this (database clock) is shown dead "
            "by `ferry ctl status`; one dead for an hour is forgotten."
        ),
    ] = default(Duration(10))
    database_timeout: Annotated[
        Duration,
        Meta(
            description="Longest a heartbeat's connect or transaction may take; a node cut off from the "
            "database stops its singletons once its leases run out, whatever this is."
        ),
    ] = default(Duration(2))

    delivery_lease: Annotated[
        Duration,
        Meta(
            description="How long a delivery a node's sink has claimed stays that node's without a new "
            "fetch (database clock). A node that dies holds its claims this long; then any node resends "
            "them under the same Idempotency-Key. Longer than the slowest request a sink may make."
        ),
    ] = default(Duration(60))

    def __post_init__(self) -> None:
        if self.heartbeat <= 0:
            raise ValueError("heartbeat must be more than 0s")
        if self.lease_ttl < 3 * self.heartbeat:
            raise ValueError(
                f"lease_ttl ({self.lease_ttl:g}s) must be at least 3 heartbeats ({3 * self.heartbeat:g}s), "
                "or one late heartbeat loses every lease"
            )
        if self.delivery_lease <= 0:
            raise ValueError("delivery_lease must be more than 0s")
        if self.database_timeout <= 0 or self.database_timeout >= self.lease_ttl:
            raise ValueError("database_timeout must be more than 0s and less than lease_ttl")
