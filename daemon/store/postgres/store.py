"""`PostgresStore`: the outbox on a PostgreSQL server, shared by several ferry nodes.

The same interface (`daemon.store.api.Outbox`), guarantees and failure policies as SQLite's
`Store`, on the same group-commit engine (`daemon.store.engine`): one writer thread owns one
psycopg connection (psycopg's sync API: its async one needs asyncio) and commits the requests
waiting in its queue as one transaction, `synchronous_commit` on. The domain operations are
`daemon.store.operations`' (declared once for both backends) over `PostgresFunctions`, this
backend's store functions; a singleton's commits run the fencing check of its lease first.

What differs, and why (`daemon.store.postgres.connect`, `.outbox`, `.deliveries`):
    - the server can be unreachable: a request fails with `StoreUnavailable` (a webhook answers
      503), and the writer reconnects with backoff by itself;
    - events commit in seq order across nodes (the events lock), so cursors never skip one;
    - deliveries are claimed with a lease (`node`, `lease` seconds) so two nodes never hold one
      at once while the lease holds, and outcomes are recorded only by the lease's holder;
    - the schema is migrated once under an advisory lock; a node whose code does not match the
      database's version refuses to start (`StoreCorrupt`, exit 2).
"""

from __future__ import annotations

from typing import Final, final

from daemon.store import fencing
from daemon.store.api import Outbox
from daemon.store.at_rest import Cipher
from daemon.store.functions import Functions
from daemon.store.operations import Operations
from daemon.store.postgres import confirmations, deliveries, ops, outbox, stages
from daemon.store.postgres.connect import Db, PostgresTransactions, describe, open_database

DEFAULT_LEASE = 60.0
"""Seconds a claimed delivery stays this node's without a new fetch (`[cluster] delivery_lease`)."""


@final
class PostgresFunctions:
    """`daemon.store.functions.Functions` on a PostgreSQL connection (`Db`)."""

    guarded = staticmethod(fencing.guarded)
    insert_events = staticmethod(outbox.insert_events)
    cursor = staticmethod(outbox.cursor)
    read_events = staticmethod(outbox.read_events)
    commit_transform = staticmethod(outbox.commit_transform)
    revived = staticmethod(stages.revived)
    commit_revived = staticmethod(stages.commit_revived)
    read_head = staticmethod(deliveries.read_head)
    attempt_head = staticmethod(deliveries.attempt_head)
    stored_windows = staticmethod(stages.stored_windows)
    commit_joined = staticmethod(stages.commit_joined)
    window_contents = staticmethod(stages.window_contents)
    commit_emitted = staticmethod(stages.commit_emitted)
    due_deliveries = staticmethod(deliveries.due_deliveries)
    due_ordered = staticmethod(deliveries.due_ordered)
    next_due_after = staticmethod(deliveries.next_due_after)
    unpark = staticmethod(deliveries.unpark)
    record_outcomes = staticmethod(deliveries.record_outcomes)
    renew_claims = staticmethod(deliveries.renew_claims)
    quarantine_head = staticmethod(deliveries.check_head)
    load_poll_state = staticmethod(stages.load_state)
    save_poll_state = staticmethod(stages.save_state)
    load_page_checks = staticmethod(stages.load_checks)
    commit_pages = staticmethod(stages.commit_pages)
    list_dead = staticmethod(ops.list_dead)
    show_delivery = staticmethod(ops.show_delivery)
    retry_dead = staticmethod(ops.retry_dead)
    purge_dead = staticmethod(ops.purge_dead)
    record_audit = staticmethod(ops.record_audit)
    read_audit = staticmethod(ops.read_audit)
    event_outcomes = staticmethod(confirmations.event_outcomes)
    counts = staticmethod(outbox.counts)
    pending_total = staticmethod(outbox.pending_total)
    due_counts = staticmethod(ops.due_counts)
    transform_backlog = staticmethod(ops.transform_backlog)
    error_counts = staticmethod(ops.error_counts)
    delivery_latencies = staticmethod(ops.delivery_latencies)
    replay_selection = staticmethod(ops.replay_selection)
    start_replay = staticmethod(ops.start_replay)
    insert_replay = staticmethod(ops.insert_replay)
    load_alert_states = staticmethod(stages.load_alert_states)
    save_alert_states = staticmethod(stages.save_alert_states)
    load_refresh_token = staticmethod(stages.load_refresh_token)
    save_refresh_token = staticmethod(stages.save_refresh_token)
    prune = staticmethod(outbox.prune)
    prune_audit = staticmethod(ops.prune_audit)
    pending_by_stage = staticmethod(ops.pending_by_stage)


FUNCTIONS: Final[Functions[Db]] = PostgresFunctions()
"""The table `PostgresStore` runs on (mypy checks here that it is the whole of `Functions`)."""


@final
class PostgresStore(Operations[Db]):
    """The outbox on PostgreSQL. Open with `PostgresStore.open(url, node=...)`, serve with
    `await nursery.start(store.run)`, `close()` after."""

    def __init__(self, url: str, *, node: str, lease: float, max_batch: int, cipher: Cipher | None) -> None:
        super().__init__(FUNCTIONS, max_batch=max_batch, thread_name="ferry-store-pg")
        self.url = url
        self.node = node
        self.lease = lease
        self.claim_lease = lease / 2  # a fetch returns rows with at least half their lease left
        self._cipher = cipher

    def __repr__(self) -> str:
        return f"<PostgresStore {describe(self.url)} node={self.node!r}>"

    @classmethod
    def open(
        cls,
        url: str,
        *,
        node: str,
        lease: float = DEFAULT_LEASE,
        max_batch: int = 4096,
        cipher: Cipher | None = None,
    ) -> PostgresStore:
        """Connect, migrate (once, under the schema lock) and check; see `connect.open_database`.

        Raises `StoreUnavailable` (no server), `StoreCorrupt` (not ferry's database, or another
        schema version) or `StoreKeyMissing`: the daemon refuses to start (exit 2).
        """
        store = cls(url, node=node, lease=lease, max_batch=max_batch, cipher=cipher)
        conn = open_database(url, node=node, cipher=cipher)
        store._transactions = PostgresTransactions(url, conn, cipher=cipher, node=node, lease=lease)
        return store

    def close(self) -> None:
        """Close the connection (after `run` has returned)."""
        transactions = self._transactions
        if isinstance(transactions, PostgresTransactions):
            transactions.close()


def _implements_outbox(store: PostgresStore) -> Outbox:
    """mypy checks here that `PostgresStore` implements the whole interface."""
    return store
