"""`ferry ctl pause`, `resume` and `drain`: holding parts of the pipeline, in memory.

Pausing:
    Paused state lives in memory: a restarted daemon starts with everything resumed
    (a pause is an operator's temporary hold, not configuration). A paused webhook
    source answers 503 with `Retry-After`, so its senders keep their events; a paused
    poll source runs no new cycle; a paused sink stops fetching and its deliveries wait in
    the store. A transform cannot be paused (pause its source or its sinks).

Drain:
    Every webhook source answers 503 from then on and every poll source stops after its
    cycle under way; the transforms and sinks keep working until nothing is left that is
    due (transform backlog plus due pending deliveries of sinks that are not paused) or the
    timeout passes, polled every `DRAIN_POLL` s on trio's clock. The answer is sent, then the
    daemon stops as on SIGTERM and exits 0. Retries scheduled for later stay in the store for
    the next start. A client that goes away does not cancel a drain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import msgspec
import trio
from msgspec import Struct

from daemon.config.kinds import WebhookSourceConfig
from daemon.control.protocol import CommandError, answered
from daemon.control.server import Call
from daemon.errors import StoreUnavailable

if TYPE_CHECKING:
    from daemon.running import Running

DRAIN_POLL = 0.2


class Pausable(Protocol):
    """A sink or a poller as the control commands see it."""

    @property
    def paused(self) -> bool: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class PauseResult(Struct, frozen=True):
    name: str
    kind: str
    paused: bool
    changed: bool


class DrainProgress(Struct, frozen=True):
    elapsed_s: float
    outstanding: int
    by_stage: dict[str, int]


class DrainResult(Struct, frozen=True):
    drained: bool
    elapsed_s: float
    outstanding: int
    by_stage: dict[str, int]


def pausable(running: Running, name: str) -> Pausable:
    """The sink or poller called `name` (`KeyError` if there is none)."""
    actor: Pausable = running.actors.pausable(name)
    return actor


def paused_names(running: Running) -> list[str]:
    """Paused sources (webhook and poll), then paused sinks, as `status` lists them."""
    config = running.config
    sinks = [name for name in config.sinks if name in running.actors and pausable(running, name).paused]
    polls = [name for name in config.sources if name in running.actors and pausable(running, name).paused]
    return sorted([*running.pauses.sources, *polls]) + sinks


def _hold(actor: Pausable, pause: bool) -> bool:
    changed = actor.paused != pause
    if pause:
        actor.pause()
    else:
        actor.resume()
    return changed


def pause_or_resume(running: Running, name: str, *, pause: bool) -> PauseResult:
    """`pause` (or `resume` with `pause=False`) the source or sink called `name`."""
    config = running.config
    if name in config.sources:
        if name in running.actors:  # a poll source: its poller holds the pause
            return PauseResult(name, "source", pause, _hold(pausable(running, name), pause))
        if not isinstance(config.sources[name], WebhookSourceConfig):
            raise CommandError(f"source {name!r} cannot be paused")
        sources = running.pauses.sources
        changed = (name not in sources) if pause else (name in sources)
        if pause:
            sources.add(name)
        else:
            sources.discard(name)
        return PauseResult(name, "source", pause, changed)
    if name in config.sinks:
        return PauseResult(name, "sink", pause, _hold(pausable(running, name), pause))
    if name in config.transforms:
        raise CommandError(f"{name!r} is a transform; pause its source or its sinks instead")
    raise CommandError(f"no source or sink named {name!r}")


async def for_the_cluster(running: Running, result: PauseResult) -> PauseResult:
    """In cluster mode, the pause applied here is stored for every node (docs/cluster.md)."""
    node = running.cluster
    if node is None:
        return result
    changed = await answered(node.coordination.set_paused(result.name, result.paused, node.info.id))
    return msgspec.structs.replace(result, changed=changed)


async def start_cluster_drain(running: Running, timeout: float) -> int | None:
    """In cluster mode, start the drain every node joins (docs/cluster.md); its number."""
    node, follower = running.cluster, running.follower
    if node is None or follower is None:
        return None
    try:
        drain = await answered(node.coordination.start_drain(node.info.id, timeout))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    follower.join(drain.number)
    return drain.number


async def outstanding(running: Running, now: float) -> dict[str, int]:
    """What a drain waits for: each transform's backlog, each active sink's deliveries due at `now`."""
    config = running.config
    active = [name for name in config.sinks if name in running.actors and not pausable(running, name).paused]
    due = await answered(running.store.due_counts(active, now))
    backlog = await answered(
        running.store.transform_backlog({n: t.inputs for n, t in config.transforms.items()})
    )
    return {name: count for name, count in {**backlog, **due}.items() if count}


async def drain(
    running: Running,
    timeout: float,
    call: Call,
    wall: Callable[[], float],
    cluster_drain: int | None = None,
) -> DrainResult:
    """`drain`: stop intake, wait up to `timeout` for what is due, then stop the daemon (after the
    answer). `wall` is the wall clock deliveries are due by; `cluster_drain` the cluster-wide drain
    this node started (`start_cluster_drain`), ended here for every node that joined it."""
    running.pauses.draining = True
    for name in running.config.sources:
        if name in running.actors:  # a poll source: no new cycle, or the backlog keeps growing
            pausable(running, name).pause()
    call.after_answer(running.stop.set)
    began = trio.current_time()
    deadline = began + timeout
    reported: dict[str, int] | None = None
    while True:
        by_stage = await outstanding(running, wall())
        elapsed = round(trio.current_time() - began, 3)
        if not by_stage or trio.current_time() >= deadline:
            break
        if by_stage != reported:
            reported = by_stage
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await call.progress(DrainProgress(elapsed, sum(by_stage.values()), by_stage))
        await trio.sleep(DRAIN_POLL)
    if cluster_drain is not None and running.cluster is not None:
        with contextlib.suppress(StoreUnavailable):  # its deadline ends it anyway
            await running.cluster.coordination.finish_drain(cluster_drain)
    return DrainResult(not by_stage, elapsed, sum(by_stage.values()), by_stage)
