"""`ferry ctl status` and `ferry ctl stats`: what the daemon is doing, read without changing it.

Status: version, uptime, config, each actor's state, each stage's queue (a sink's pending,
delivered and dead rows; a transform's backlog; rows of stages no longer configured), paused
components, throughput, pollers, rate limits and each http sink's admission guard. Stats: counts
per stage and state, failures by error kind, each sink's counters since start, events received
per webhook source, delivery latency percentiles, pollers' counters. Neither is audited (reads);
secrets and masked values never appear in either (`[telemetry] mask`).
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import TYPE_CHECKING, Any

import msgspec
from msgspec import Struct

from daemon.cluster.control import NodeStatus, node_statuses
from daemon.cluster.singleton import Singleton
from daemon.control.pausing import pausable, paused_names
from daemon.control.protocol import answered
from daemon.limits.ratelimit import RateLimitStatus
from daemon.registry import PollStatus
from daemon.reload import config_sha256
from daemon.store import ops
from daemon.store.postgres.listener import WakeListener
from daemon.supervisor import ActorState
from daemon.telemetry.masking import Redactor

if TYPE_CHECKING:
    from daemon.running import Running


class ActorStatus(Struct, frozen=True):
    name: str
    state: str
    restarts: int
    last_error: str | None


class StageStatus(Struct, frozen=True):
    kind: str  # sink | transform | unconfigured
    pending: int
    delivered: int
    dead: int
    paused: bool = False


class WakeStatus(Struct, frozen=True):
    """Whether this node hears the other nodes' commits at once (docs/cluster.md)."""

    listening: bool
    heard: int  # notifications from other nodes since the start
    connections: int  # times its connection was opened: more than 1 means it was lost and re-opened


class StatusResult(Struct, frozen=True):
    version: str
    pid: int
    uptime_s: float
    config_path: str | None
    config_sha256: str
    draining: bool
    paused: list[str]
    actors: list[ActorStatus]
    stages: dict[str, StageStatus]
    received_per_s: float | None = None  # over the last minute; None until sampled twice
    delivered_per_s: float | None = None
    polls: dict[str, PollStatus] = {}  # per poll source (docs/polling.md)
    rate_limits: dict[str, RateLimitStatus] = {}
    guards: dict[str, Any] = {}  # per http sink: concurrency limit, breaker per URL (actors/sink/guard.py)
    nodes: list[NodeStatus] | None = None  # cluster mode: every node (docs/cluster.md); None on one node
    wake: WakeStatus | None = None  # cluster mode: this node's ear for the other nodes' commits


class Failure(Struct, frozen=True):
    stage: str
    state: str  # retrying | dead
    last_status: int | None
    count: int
    error_type: str = ""  # http_503, timeout, connection_refused, connection_closed, dns, tls, jq, other


class SinkCounters(Struct, frozen=True):
    delivered: int
    retried: int
    dead: int
    stale: int = 0  # dropped by `ordering`: an older version than one already delivered


class Latency(Struct, frozen=True):
    """Creation → delivery of a sink's most recent deliveries still in the store, in ms."""

    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


class StatsResult(Struct, frozen=True):
    stages: dict[str, dict[str, int]]
    failures: list[Failure]
    since_start: dict[str, SinkCounters]
    received: dict[str, int] = {}  # events accepted per webhook source since start
    latency: dict[str, Latency] = {}  # per sink, over its last `ops.LATENCY_SAMPLE` deliveries
    polls: dict[str, PollStatus] = {}  # per poll source since start: items, repeats, errors by kind


def version() -> str:
    """ferry's installed version (`unknown` when run from a tree that is not installed)."""
    try:
        return metadata.version("ferry")
    except metadata.PackageNotFoundError:
        return "unknown"


async def status(running: Running, redactor: Redactor, *, uptime_s: float) -> StatusResult:
    """`status`: `redactor` scrubs secrets (URL credentials too) from errors and guards."""
    config = running.config
    counts = await answered(running.store.counts())
    backlog = await answered(
        running.store.transform_backlog({n: t.inputs for n, t in config.transforms.items()})
    )
    empty = {"pending": 0, "delivered": 0, "dead": 0}
    stages: dict[str, StageStatus] = {}
    for name in config.sinks:
        c = counts.get(name, empty)
        paused = name in running.actors and pausable(running, name).paused
        stages[name] = StageStatus("sink", c["pending"], c["delivered"], c["dead"], paused)
    for name in config.transforms:
        c = counts.get(name, empty)
        stages[name] = StageStatus("transform", backlog.get(name, 0), 0, c["dead"])
    for name, c in counts.items():
        if name not in stages:
            stages[name] = StageStatus("unconfigured", c["pending"], c["delivered"], c["dead"])
    actors = [
        ActorStatus(a.name, _shown_state(a), a.restarts, redactor.scrub(a.last_error))
        for a in running.supervisor.actors.values()
    ]
    throughput = running.throughput
    received_rate, delivered_rate = throughput.rates() if throughput is not None else (None, None)
    return StatusResult(
        version=version(),
        pid=os.getpid(),
        uptime_s=round(uptime_s, 3),
        config_path=str(running.loaded.path) if running.loaded.path else None,
        config_sha256=config_sha256(running.loaded),
        draining=running.pauses.draining,
        paused=paused_names(running),
        actors=actors,
        stages=stages,
        received_per_s=None if received_rate is None else round(received_rate, 2),
        delivered_per_s=None if delivered_rate is None else round(delivered_rate, 2),
        polls=polls(running),
        rate_limits={name: limiter.status() for name, limiter in running.rate_limits.items()},
        guards=redactor.mask(msgspec.to_builtins(guards(running))),
        nodes=await answered(node_statuses(running.cluster)) if running.cluster else None,
        wake=_wake_status(running.wake_listener),
    )


def _wake_status(listener: WakeListener | None) -> WakeStatus | None:
    return None if listener is None else WakeStatus(listener.connected, listener.heard, listener.connections)


def _shown_state(actor: ActorState) -> str:
    """An actor's state; `standby` for a cluster singleton running while another node holds its lease."""
    if (
        actor.state == "running"
        and isinstance(actor.incarnation, Singleton)
        and actor.incarnation.role == "standby"
    ):
        return "standby"
    return actor.state


def guards(running: Running) -> dict[str, Any]:
    """Each http sink's admission state: concurrency limit, circuit breaker per URL."""
    found = {}
    for name in running.config.sinks:
        sink = running.actors.sinks.get(name)
        if sink is not None and sink.guard is not None:
            found[name] = sink.guard.status()
    return found


async def stats(running: Running) -> StatsResult:
    """`stats`: counters since start from the actors and the daemon's metrics, the rest from the store."""
    counts = await answered(running.store.counts())
    failures = [Failure(*row) for row in await answered(running.store.error_counts())]
    since_start = {}
    for name in running.config.sinks:
        sink = running.actors.sinks.get(name)
        if sink is not None:
            since_start[name] = SinkCounters(sink.delivered, sink.retried, sink.dead, sink.stale)
    latency = {}
    for name in running.config.sinks:
        samples = sorted(await answered(running.store.delivery_latencies(name)))
        if samples:
            ms = [round(ops.percentile(samples, share) * 1000, 3) for share in (0.5, 0.9, 0.99, 1.0)]
            latency[name] = Latency(len(samples), *ms)
    return StatsResult(counts, failures, since_start, dict(running.metrics.received), latency, polls(running))


def polls(running: Running) -> dict[str, PollStatus]:
    """Each running poller's state and counters (docs/polling.md)."""
    return {
        name: poller.status()
        for name, poller in running.actors.pollers.items()
        if name in running.config.sources
    }
