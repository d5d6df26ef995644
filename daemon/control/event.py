"""`ferry ctl event ID`: one event's journey (the event, what was derived from it, each delivery's
outcome), read from the store (`daemon.store.confirmations`). Payloads are answered masked, and
their masked values are scrubbed from responses and errors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from daemon.control.protocol import CommandError, answered
from daemon.store import confirmations
from daemon.telemetry.masking import Redactor

if TYPE_CHECKING:
    from daemon.running import Running


async def event(running: Running, event_id: str, redactor: Redactor) -> confirmations.EventReport:
    report = await answered(running.store.event_outcomes(event_id))
    if report is None:
        raise CommandError(f"no stored event with id {event_id!r} (or derived from it)")
    if not (redactor.rules or redactor.secrets):
        return report
    events = [
        msgspec.structs.replace(
            each,
            payload=redactor.mask(each.payload),
            deliveries=[
                msgspec.structs.replace(
                    delivery,
                    response=redactor.scrub(delivery.response, each.payload),
                    error=redactor.scrub(delivery.error, each.payload),
                )
                for delivery in each.deliveries
            ],
        )
        for each in report.events
    ]
    return msgspec.structs.replace(report, events=events)
