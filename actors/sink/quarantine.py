"""The crash quarantine of a sink (`daemon.store.quarantine`, applied to deliveries).

Each incarnation of a sink, just before its first send (`Fetcher.check_head`, once admitted:
an incarnation that dies before it sends anything, say while another stage's poison kills the
process at every start, counts against nothing), records the delivery at the head of its stage
(the first due row, in the order the sink fetches) in the same transaction that checks it: when
that same row has been the head of `quarantine_after` incarnations already without an outcome
(the sink crashed, or the process died, each time), it is dead-lettered as quarantined instead of
being sent again. Poison that raises while sending is isolated without a crash (`Sink._isolate`);
this is for what is not (a crash outside that net, a killed process).

Sinks with `ordering` are left out: a dead row there must go through the ordering's bookkeeping.
"""

from __future__ import annotations

import logging

from daemon.store.api import Outbox
from daemon.telemetry import metrics

log = logging.getLogger("ferry.sink")


async def quarantine_head(store: Outbox, stage: str, quarantine_after: int) -> int | None:
    """`Outbox.quarantine_head` (its own transaction), then log and count a quarantined delivery;
    the rowid of the delivery quarantined, if one was."""
    found = await store.quarantine_head(stage, quarantine_after)
    if found is None:
        return None
    due, attempts = found
    metrics.current().dead_letters.add(1, {"stage": stage})
    log.error(
        "delivery quarantined",
        extra={
            "fields": {"sink": stage, "delivery_id": due.id, "event_id": due.event_id, "attempts": attempts}
        },
    )
    return due.rowid
