"""`ferry ctl dlq list|show|retry|purge`: the dead letters of sinks and transforms.

A sink's dead letters are sent again by `retry`; a transform's (not an aggregating one's) are run
through the transform again (`daemon.store.transform_retry`). `retry` and `purge` act on ids named,
or on everything the filters select with `all`; `purge --dry-run` only counts. Payloads and error
texts are answered masked (`[telemetry] mask`, the sinks' header secrets).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
from msgspec import Struct

from daemon.control.protocol import (
    CommandError,
    DlqListRequest,
    DlqPurgeRequest,
    DlqRetryRequest,
    answered,
)
from daemon.store.ops import DeadFilter, DeadLetter
from daemon.telemetry.masking import Redactor

if TYPE_CHECKING:
    from daemon.running import Running


class DlqListResult(Struct, frozen=True):
    total: int
    items: list[DeadLetter]


class DlqShowResult(Struct, frozen=True):
    state: str
    delivery: DeadLetter


class DlqRetryResult(Struct, frozen=True):
    retried: int
    by_sink: dict[str, int]
    skipped: int  # ids asked for that are not dead letters of a configured sink


class DlqPurgeResult(Struct, frozen=True):
    purged: int
    dry_run: bool


def masked(letter: DeadLetter, redactor: Redactor) -> DeadLetter:
    """A dead letter as shown: payload masked, secrets and masked values gone from its error."""
    return msgspec.structs.replace(
        letter,
        payload=redactor.mask(letter.payload),
        last_error=redactor.scrub(letter.last_error, letter.payload),
    )


def selection(request: DlqListRequest | DlqRetryRequest | DlqPurgeRequest) -> DeadFilter:
    """The store's filter for what `request` names."""
    ids = getattr(request, "ids", ())
    return DeadFilter(
        ids=ids,
        stages=[request.sink] if request.sink else [],
        since=request.since,
        error=request.error,
    )


async def list_dead(running: Running, request: DlqListRequest, redactor: Redactor) -> DlqListResult:
    total, items = await answered(running.store.list_dead(selection(request), request.limit))
    return DlqListResult(total, [masked(item, redactor) for item in items])


async def show(running: Running, delivery_id: str, redactor: Redactor) -> DlqShowResult:
    found = await answered(running.store.show_delivery(delivery_id))
    if found is None:
        raise CommandError(f"no delivery with id {delivery_id!r}")
    return DlqShowResult(found[0], masked(found[1], redactor))


async def retry(running: Running, request: DlqRetryRequest) -> DlqRetryResult:
    config = running.config
    transforms = [name for name, each in config.transforms.items() if each.aggregate is None]
    sinks = [*config.sinks, *transforms]
    if request.sink is not None and request.sink not in sinks:
        raise CommandError(
            f"no sink or transform named {request.sink!r} "
            "(only a sink's or a transform's dead letters can be retried)"
        )
    if not (request.ids or request.all):
        raise CommandError("name the dead letters to retry by id, or pass all (with filters)")
    chosen = selection(request)._replace(stages=[request.sink] if request.sink else sinks)
    by_sink = await answered(running.store.retry_dead(chosen, wake=sinks))
    retried = sum(by_sink.values())
    return DlqRetryResult(retried, by_sink, max(0, len(request.ids) - retried))


async def purge(running: Running, request: DlqPurgeRequest) -> DlqPurgeResult:
    if not (request.ids or request.all):
        raise CommandError("name the dead letters to purge by id, or pass all (with filters)")
    purged = await answered(running.store.purge_dead(selection(request), dry_run=request.dry_run))
    return DlqPurgeResult(purged, request.dry_run)
