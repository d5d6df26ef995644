"""`ferry ctl tap`: what passes one component, live.

Subscribes to the daemon's taps (`daemon.telemetry.tap`, `Running.taps`) and answers with
progress lines `{"events": [...], "dropped": N}`: one at once (subscribed), then one per chunk of
at most `TAP_CHUNK` events, or an empty one every `TAP_HEARTBEAT` s, which is how a client that
went away is noticed. Lossy by design (a slow client loses records, counted in `dropped`); not
audited (a read). Payloads and errors are masked in this connection's task, never in the pipeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio
from msgspec import Struct

from daemon.control.protocol import CommandError, TapRequest
from daemon.control.server import Call
from daemon.telemetry.masking import Redactor, decode_payload
from daemon.telemetry.tap import Record

if TYPE_CHECKING:
    from daemon.running import Running

TAP_HEARTBEAT = 1.0  # an idle tap sends an empty progress line this often: a gone client is noticed
TAP_CHUNK = 256  # most events in one progress line


class TapProgress(Struct, frozen=True):
    events: list[Any]
    dropped: int  # records this tap lost so far because the client read too slowly


class TapResult(Struct, frozen=True):
    events: int
    dropped: int


async def tap(
    running: Running, request: TapRequest, call: Call, redactor: Callable[[], Redactor]
) -> TapResult:
    """Stream what passes `request.name` until the limit, the timeout, or the client leaves.
    `redactor` is read for each chunk, so a reload's new masking rules apply at once."""
    config, name = running.config, request.name
    if name not in config.sources and name not in config.transforms and name not in config.sinks:
        raise CommandError(f"no source, transform or sink named {name!r}")
    limit = request.limit
    sent = 0
    with running.taps.subscribe(name, request.buffer) as subscribed:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await call.progress(TapProgress([], 0))  # tapping from now on
        while limit is None or sent < limit:
            records: list[Record] = []
            with trio.move_on_after(TAP_HEARTBEAT):
                records.append(await subscribed.receive.receive())
            while len(records) < TAP_CHUNK:
                try:
                    records.append(subscribed.receive.receive_nowait())
                except trio.WouldBlock:
                    break
            if limit is not None:
                records = records[: limit - sent]
            masking = redactor()
            events = [shown(name, record, masking) for record in records]
            try:
                await call.progress(TapProgress(events, subscribed.dropped))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break  # the client went away (Ctrl-C)
            sent += len(events)
        return TapResult(sent, subscribed.dropped)


def shown(name: str, record: Record, redactor: Redactor) -> dict[str, Any]:
    """One tapped record as the client sees it: payload decoded and masked, error scrubbed."""
    payload = decode_payload(record.payload)
    event: dict[str, Any] = {
        "component": name,
        "kind": record.kind,
        "at": record.at,
        "event_id": record.event_id,
    }
    if record.extra:
        event.update(record.extra)
        if event.get("error"):
            event["error"] = redactor.scrub(event["error"], payload)
    event["payload"] = redactor.mask(payload)
    return event
