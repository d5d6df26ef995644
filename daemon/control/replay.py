"""`ferry ctl replay`: deliver a source's stored events again.

New pending deliveries, due now, for the stored events of a source received in a window and,
for a sink fed by a transform, for that transform's stored outputs derived from them
(transforms are not run again). Every sink downstream of the source gets them, or only `to`.
Ids are `EVENT_ID.SINK.rN`, N the replay's number (the `replays` table), so a receiver does not
drop them as duplicates of the first delivery. Written `REPLAY_CHUNK` events per transaction
with a progress line after each.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import trio
from msgspec import Struct

from daemon.config.root import Config, downstream
from daemon.control.protocol import CommandError, ReplayRequest, answered
from daemon.control.server import Call

if TYPE_CHECKING:
    from daemon.running import Running

REPLAY_CHUNK = 1000  # events per transaction (and per progress line) of a replay


class ReplayProgress(Struct, frozen=True):
    events: int  # replayed so far
    total: int


class ReplayResult(Struct, frozen=True):
    replay: int  # its number: new delivery ids end in `.rN`
    events: int
    deliveries: int
    by_sink: dict[str, int]


def routes(config: Config, source: str, to: str | None) -> dict[str, list[str]]:
    """Each stream to replay (the source, the transforms fed by it) -> the chosen sinks reading it."""
    if source not in config.sources:
        raise CommandError(f"no source named {source!r}")
    if to is not None and to not in config.sinks:
        raise CommandError(f"no sink named {to!r}")
    wiring = downstream(config)
    reach, todo = [source], [source]
    while todo:
        for name in wiring[todo.pop()][0]:
            if name not in reach:
                reach.append(name)
                todo.append(name)
    chosen = [to] if to is not None else list(config.sinks)
    found = {stream: [sink for sink in chosen if stream in config.sinks[sink].inputs] for stream in reach}
    found = {stream: sinks for stream, sinks in found.items() if sinks}
    if to is not None and not found:
        raise CommandError(f"sink {to!r} is not downstream of source {source!r}")
    return found


async def replay(running: Running, request: ReplayRequest, call: Call) -> ReplayResult:
    chosen = routes(running.config, request.source, request.to)
    if request.since is not None and request.until is not None and request.since >= request.until:
        raise CommandError("--since must be before --until")
    sinks = sorted({sink for each in chosen.values() for sink in each})
    store = running.store
    selected = await answered(
        store.replay_selection(
            source=request.source, since=request.since, until=request.until, streams=list(chosen)
        )
    )
    number = await answered(
        store.start_replay(source=request.source, since=request.since, until=request.until, sinks=sinks)
    )
    by_sink = dict.fromkeys(sinks, 0)
    for start in range(0, len(selected), REPLAY_CHUNK):
        seqs_by_sink: dict[str, list[int]] = {sink: [] for sink in sinks}
        for seq, stream in selected[start : start + REPLAY_CHUNK]:
            for sink in chosen[stream]:
                seqs_by_sink[sink].append(seq)
        created = await answered(store.insert_replay(number=number, seqs_by_sink=seqs_by_sink, wake=sinks))
        for sink, count in created.items():
            by_sink[sink] += count
        done = min(start + REPLAY_CHUNK, len(selected))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await call.progress(ReplayProgress(done, len(selected)))
    return ReplayResult(number, len(selected), sum(by_sink.values()), by_sink)
