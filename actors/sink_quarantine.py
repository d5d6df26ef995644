"""The crash quarantine of a sink (`daemon.quarantine`, applied to deliveries).

Each incarnation of a sink, before it sends anything, records the delivery at the head of its
stage (the first due row, in the order the sink fetches) in the same transaction that checks it:
when that same row has been the head of `quarantine_after` incarnations already without an outcome
(the sink crashed, or the process died, each time), it is dead-lettered as quarantined instead of
being sent again. Poison that raises while sending is isolated without a crash (`Sink._isolate`);
this is for what is not (a crash outside that net, a killed process).

Sinks with `ordering` are left out: a dead row there must go through the ordering's bookkeeping.
"""

from __future__ import annotations

import logging
import time
from functools import partial

from daemon import metrics
from daemon.outbox import Connection, Due, due_deliveries
from daemon.quarantine import attempt_head, quarantine_reason
from daemon.schema import DEAD
from daemon.store import Store

log = logging.getLogger("ferry.sink")


def check_head(conn: Connection, stage: str, quarantine_after: int) -> tuple[Due, int] | None:
    """Record the head delivery of `stage`; quarantine it (and return it with its count) when
    it was the head of more than `quarantine_after` incarnations (its attempts count those)."""
    rows = due_deliveries(conn, stage, time.time(), 1)
    if not rows:
        return None
    (due,) = rows
    head = attempt_head(conn, stage, due.rowid, due.rowid)
    if head.attempts <= quarantine_after:
        return None
    crashes = head.attempts - 1
    conn.execute(
        f"UPDATE deliveries SET state = {DEAD}, attempts = attempts + ?, finished_at = ?, last_error = ? "
        "WHERE rowid = ?",
        (crashes, time.time(), quarantine_reason(f"sink {stage}", crashes), due.rowid),
    )
    return due, crashes


async def quarantine_head(store: Store, stage: str, quarantine_after: int) -> None:
    """`check_head` in its own transaction, then log and count a quarantined delivery."""
    found = await store.call_until_committed(
        partial(check_head, stage=stage, quarantine_after=quarantine_after)
    )
    if found is None:
        return
    due, attempts = found
    metrics.current().dead_letters.add(1, {"stage": stage})
    log.error(
        "delivery quarantined",
        extra={
            "fields": {"sink": stage, "delivery_id": due.id, "event_id": due.event_id, "attempts": attempts}
        },
    )
