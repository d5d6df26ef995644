"""Alert rule states in the store (`alerts` table): plain functions of a connection.

They run on the store's writer thread like `daemon.store.ops`. A row whose JSON no longer decodes
(written by a newer ferry, or damaged) is ignored and its rule starts from `ok`, so a bad row
can cost at most one repeated notification, never the alerter.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping

from daemon.store.types import AlertState, alert_rows, alert_states

__all__ = ["AlertState", "load_states", "save_states"]


def load_states(conn: sqlite3.Connection) -> dict[str, AlertState]:
    """Every stored rule's state (`daemon.store.types.alert_states`: unreadable rows start afresh)."""
    return alert_states(conn.execute("SELECT rule, state FROM alerts").fetchall())


def save_states(conn: sqlite3.Connection, states: Mapping[str, AlertState], keep: frozenset[str]) -> None:
    """Write `states` and delete the rows of rules not in `keep` (rules no longer configured)."""
    conn.executemany(
        "INSERT INTO alerts(rule, state, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT(rule) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
        alert_rows(states, time.time()),
    )
    stored = [row[0] for row in conn.execute("SELECT rule FROM alerts").fetchall()]
    conn.executemany("DELETE FROM alerts WHERE rule = ?", [(rule,) for rule in stored if rule not in keep])
