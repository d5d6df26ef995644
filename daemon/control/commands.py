"""What each control command does to the running daemon; `ControlServer` hands requests here.

Audit:
    Every command that changes something (`pause`, `resume`, `dlq retry`, `dlq purge`,
    `drain`, `reload`, `replay`) is recorded in the store's `audit` table once it has run: time, the peer's
    uid and pid, the command, its arguments as JSON and its outcome (`ok: …` or
    `error: …`). Reads (`status`, `dlq list/show`, `stats`, `audit`) are not recorded.

Pausing:
    Paused state lives in memory: a restarted daemon starts with everything resumed
    (a pause is an operator's temporary hold, not configuration). A paused webhook
    source answers 503 with `Retry-After`, so its senders keep their events; a paused
    sink stops fetching and its deliveries wait in the store.

Drain:
    Every webhook source answers 503 from then on and every poll source stops after its
    cycle under way; the transforms and sinks keep
    working until nothing is left that is due (transform backlog plus due pending
    deliveries of sinks that are not paused) or the timeout passes. The answer is sent,
    then the daemon stops as on SIGTERM and exits 0. Retries scheduled for later stay
    in the store for the next start. A client that goes away does not cancel a drain.

Masking:
    `dlq list/show` payloads and error texts, and the audit trail's arguments, go through
    `[telemetry] mask` and the sinks' header secrets (`daemon.telemetry.masking`) before they are
    answered or recorded.

Tap:
    `tap` subscribes to `daemon.telemetry.tap` and answers with progress lines `{"events": [...],
    "dropped": N}`: one at once (subscribed), then one per chunk of events, or an empty one
    every `TAP_HEARTBEAT` s, which is how a client that went away is noticed. Lossy by
    design; not audited (a read).

Reload:
    See `daemon.reload`. A refused reload (an invalid file, a section that cannot change
    live) is answered as an error listing every problem; nothing changed.

Replay:
    New pending deliveries, due now, for the stored events of a source received in a
    window and, for a sink fed by a transform, for that transform's stored outputs
    derived from them (transforms are not run again). Every sink downstream of the
    source gets them, or only `to`. Ids are `EVENT_ID.SINK.rN`, N the replay's number
    (the `replays` table), so a receiver does not drop them as duplicates of the first
    delivery. Written `REPLAY_CHUNK` events per transaction with a progress line after each.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Awaitable
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, final

import msgspec
import trio
from msgspec import Struct

from daemon.cluster.control import NodeStatus, node_statuses
from daemon.cluster.singleton import Singleton
from daemon.config.kinds import WebhookSourceConfig
from daemon.config.root import Config, LoadedConfig, downstream
from daemon.control.protocol import (
    MUTATING,
    AlertsRequest,
    AuditRequest,
    CommandError,
    DlqListRequest,
    DlqPurgeRequest,
    DlqRetryRequest,
    DlqShowRequest,
    DrainRequest,
    EventRequest,
    PauseRequest,
    ReloadRequest,
    ReplayRequest,
    ResumeRequest,
    StatsRequest,
    StatusRequest,
    TapRequest,
)
from daemon.control.server import Call, Peer
from daemon.errors import StoreUnavailable
from daemon.limits.ratelimit import RateLimitStatus
from daemon.registry import AlertView, PollStatus
from daemon.reload import ReloadResult, config_sha256, reload
from daemon.store import confirmations, ops
from daemon.store.ops import AuditRow, DeadFilter, DeadLetter
from daemon.supervisor import ActorState
from daemon.telemetry import metrics
from daemon.telemetry.masking import Redactor, config_redactor, decode_payload
from daemon.telemetry.tap import Record

if TYPE_CHECKING:
    from daemon.running import Running

T = TypeVar("T")
DRAIN_POLL = 0.2
TAP_HEARTBEAT = 1.0  # an idle tap sends an empty progress line this often: a gone client is noticed
TAP_CHUNK = 256  # most events in one progress line
REPLAY_CHUNK = 1000  # events per transaction (and per progress line) of a replay


class Pausable(Protocol):
    """A sink as the control commands see it."""

    @property
    def paused(self) -> bool: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...


# -- results ---------------------------------------------------------------------------------


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


class PauseResult(Struct, frozen=True):
    name: str
    kind: str
    paused: bool
    changed: bool


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


class DrainProgress(Struct, frozen=True):
    elapsed_s: float
    outstanding: int
    by_stage: dict[str, int]


class DrainResult(Struct, frozen=True):
    drained: bool
    elapsed_s: float
    outstanding: int
    by_stage: dict[str, int]


class TapProgress(Struct, frozen=True):
    events: list[Any]
    dropped: int  # records this tap lost so far because the client read too slowly


class TapResult(Struct, frozen=True):
    events: int
    dropped: int


class AuditResult(Struct, frozen=True):
    rows: list[AuditRow]


class ReplayProgress(Struct, frozen=True):
    events: int  # replayed so far
    total: int


class AlertsResult(Struct, frozen=True):
    alerts: list[AlertView]


class ReplayResult(Struct, frozen=True):
    replay: int  # its number: new delivery ids end in `.rN`
    events: int
    deliveries: int
    by_sink: dict[str, int]


def _version() -> str:
    try:
        return metadata.version("ferry")
    except metadata.PackageNotFoundError:
        return "unknown"


@final
class Commands:
    """Answers control requests against one running daemon; see the module docstring."""

    def __init__(self, running: Running, loaded: LoadedConfig) -> None:
        self._running = running
        self._started = time.monotonic()
        self._draining = False
        self._redactor_of: Config | None = None
        self._redactor_cache = Redactor()

    @property
    def _config(self) -> Config:
        return self._running.config  # a reload replaces it

    @property
    def _redactor(self) -> Redactor:
        """Masking rules and secrets of the current config (rebuilt after a reload)."""
        config = self._config
        if self._redactor_of is not config:
            self._redactor_cache = config_redactor(config, keep=self._running.redaction.redactor)
            self._redactor_of = config
        return self._redactor_cache

    async def __call__(self, request: Any, call: Call) -> Any:
        tag = type(request).__struct_config__.tag
        if tag not in MUTATING or getattr(request, "dry_run", False):
            return await self._dispatch(request, call)
        try:
            result = await self._dispatch(request, call)
        except CommandError as exc:
            await self._audit(call.peer, tag, request, f"error: {exc}")
            raise
        await self._audit(call.peer, tag, request, f"ok: {_summary(result)}")
        return result

    async def refused(self, peer: Peer, command: str, outcome: str) -> None:
        """Record a connection the access check turned away."""
        await self._store_call(
            self._running.store.record_audit(
                uid=peer.uid, pid=peer.pid, command=command, arguments="{}", outcome=outcome
            )
        )

    async def _dispatch(self, request: Any, call: Call) -> Any:
        match request:
            case StatusRequest():
                return await self.status()
            case PauseRequest(name=name):
                return await self._cluster_pause(self._pause(name, pause=True))
            case ResumeRequest(name=name):
                return await self._cluster_pause(self._pause(name, pause=False))
            case DlqListRequest():
                total, items = await self._store_call(
                    self._running.store.list_dead(self._selection(request), request.limit)
                )
                return DlqListResult(total, [self._masked(item) for item in items])
            case DlqShowRequest(id=delivery_id):
                found = await self._store_call(self._running.store.show_delivery(delivery_id))
                if found is None:
                    raise CommandError(f"no delivery with id {delivery_id!r}")
                return DlqShowResult(found[0], self._masked(found[1]))
            case DlqRetryRequest():
                return await self._retry(request)
            case DlqPurgeRequest():
                if not (request.ids or request.all):
                    raise CommandError("name the dead letters to purge by id, or pass all (with filters)")
                purged = await self._store_call(
                    self._running.store.purge_dead(self._selection(request), dry_run=request.dry_run)
                )
                return DlqPurgeResult(purged, request.dry_run)
            case EventRequest(id=event_id):
                return await self._event(event_id)
            case StatsRequest():
                return await self._stats()
            case AuditRequest(limit=limit):
                return AuditResult(await self._store_call(self._running.store.read_audit(limit)))
            case DrainRequest(timeout=timeout):
                return await self._drain(timeout, call)
            case ReloadRequest():
                return await self._reload()
            case TapRequest():
                return await self._tap(request, call)
            case ReplayRequest():
                return await self._replay(request, call)
            case AlertsRequest():
                alerter = self._running.alerter
                return AlertsResult(alerter.views() if alerter is not None else [])
        raise CommandError(f"unhandled command {type(request).__name__}")

    async def _store_call(self, operation: Awaitable[T]) -> T:
        """Await a store operation; a store outage becomes the command's error."""
        try:
            return await operation
        except StoreUnavailable as exc:
            raise CommandError(str(exc)) from None

    async def _audit(self, peer: Peer, command: str, request: Any, outcome: str) -> None:
        fields = {k: v for k, v in msgspec.structs.asdict(request).items() if k != "v" and v is not None}
        arguments = msgspec.json.encode(self._redactor.mask(fields)).decode()
        await self._store_call(
            self._running.store.record_audit(
                uid=peer.uid, pid=peer.pid, command=command, arguments=arguments, outcome=outcome
            )
        )

    async def _event(self, event_id: str) -> confirmations.EventReport:
        """`ferry ctl event`: payloads masked, and their masked values gone from answers and errors."""
        report = await self._store_call(self._running.store.event_outcomes(event_id))
        if report is None:
            raise CommandError(f"no stored event with id {event_id!r} (or derived from it)")
        redactor = self._redactor
        if not (redactor.rules or redactor.secrets):
            return report
        events = [
            msgspec.structs.replace(
                event,
                payload=redactor.mask(event.payload),
                deliveries=[
                    msgspec.structs.replace(
                        delivery,
                        response=redactor.scrub(delivery.response, event.payload),
                        error=redactor.scrub(delivery.error, event.payload),
                    )
                    for delivery in event.deliveries
                ],
            )
            for event in report.events
        ]
        return msgspec.structs.replace(report, events=events)

    def _masked(self, letter: DeadLetter) -> DeadLetter:
        """A dead letter as shown: payload masked, secrets and masked values gone from its error."""
        redactor = self._redactor
        return msgspec.structs.replace(
            letter,
            payload=redactor.mask(letter.payload),
            last_error=redactor.scrub(letter.last_error, letter.payload),
        )

    # -- tap ---------------------------------------------------------------------------------

    async def _tap(self, request: TapRequest, call: Call) -> TapResult:
        """Stream what passes `request.name` until the limit, the timeout, or the client leaves."""
        config, name = self._config, request.name
        if name not in config.sources and name not in config.transforms and name not in config.sinks:
            raise CommandError(f"no source, transform or sink named {name!r}")
        limit = request.limit
        sent = 0
        with self._running.taps.subscribe(name, request.buffer) as tap:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await call.progress(TapProgress([], 0))  # tapping from now on
            while limit is None or sent < limit:
                records: list[Record] = []
                with trio.move_on_after(TAP_HEARTBEAT):
                    records.append(await tap.receive.receive())
                while len(records) < TAP_CHUNK:
                    try:
                        records.append(tap.receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                if limit is not None:
                    records = records[: limit - sent]
                events = [self._tap_event(name, record) for record in records]
                try:
                    await call.progress(TapProgress(events, tap.dropped))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break  # the client went away (Ctrl-C)
                sent += len(events)
            return TapResult(sent, tap.dropped)

    def _tap_event(self, name: str, record: Record) -> dict[str, Any]:
        redactor = self._redactor
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

    # -- status and stats ------------------------------------------------------------------

    def _paused(self) -> list[str]:
        running = self._running
        sinks = [name for name in self._config.sinks if name in running.actors and self._sink(name).paused]
        polls = [name for name in self._config.sources if name in running.actors and self._sink(name).paused]
        return sorted([*running.pauses.sources, *polls]) + sinks

    def _sink(self, name: str) -> Pausable:
        sink: Pausable = self._running.actors.pausable(name)
        return sink

    async def status(self) -> StatusResult:
        config = self._config
        counts = await self._store_call(self._running.store.counts())
        backlog = await self._store_call(
            self._running.store.transform_backlog({n: t.inputs for n, t in config.transforms.items()})
        )
        empty = {"pending": 0, "delivered": 0, "dead": 0}
        stages: dict[str, StageStatus] = {}
        for name in config.sinks:
            c = counts.get(name, empty)
            paused = name in self._running.actors and self._sink(name).paused
            stages[name] = StageStatus("sink", c["pending"], c["delivered"], c["dead"], paused)
        for name in config.transforms:
            c = counts.get(name, empty)
            stages[name] = StageStatus("transform", backlog.get(name, 0), 0, c["dead"])
        for name, c in counts.items():
            if name not in stages:
                stages[name] = StageStatus("unconfigured", c["pending"], c["delivered"], c["dead"])
        redactor = self._redactor  # secrets (URL credentials too) never shown in a status
        actors = [
            ActorStatus(a.name, _shown_state(a), a.restarts, redactor.scrub(a.last_error))
            for a in self._running.supervisor.actors.values()
        ]
        throughput = self._running.throughput
        received_rate, delivered_rate = throughput.rates() if throughput is not None else (None, None)
        return StatusResult(
            version=_version(),
            pid=os.getpid(),
            uptime_s=round(time.monotonic() - self._started, 3),
            config_path=str(self._running.loaded.path) if self._running.loaded.path else None,
            config_sha256=config_sha256(self._running.loaded),
            draining=self._running.pauses.draining,
            paused=self._paused(),
            actors=actors,
            stages=stages,
            received_per_s=None if received_rate is None else round(received_rate, 2),
            delivered_per_s=None if delivered_rate is None else round(delivered_rate, 2),
            polls=self._polls(),
            rate_limits={name: limiter.status() for name, limiter in self._running.rate_limits.items()},
            guards=redactor.mask(msgspec.to_builtins(self._guards())),
            nodes=await self._store_call(node_statuses(self._running.cluster))
            if self._running.cluster
            else None,
        )

    def _guards(self) -> dict[str, Any]:
        """Each http sink's admission state: concurrency limit, circuit breaker per URL."""
        guards = {}
        for name in self._config.sinks:
            sink = self._running.actors.sinks.get(name)
            if sink is not None and sink.guard is not None:
                guards[name] = sink.guard.status()
        return guards

    async def _stats(self) -> StatsResult:
        counts = await self._store_call(self._running.store.counts())
        failures = [Failure(*row) for row in await self._store_call(self._running.store.error_counts())]
        since_start = {}
        for name in self._config.sinks:
            sink = self._running.actors.sinks.get(name)
            if sink is not None:
                since_start[name] = SinkCounters(sink.delivered, sink.retried, sink.dead, sink.stale)
        latency = {}
        for name in self._config.sinks:
            samples = sorted(await self._store_call(self._running.store.delivery_latencies(name)))
            if samples:
                ms = [round(ops.percentile(samples, share) * 1000, 3) for share in (0.5, 0.9, 0.99, 1.0)]
                latency[name] = Latency(len(samples), *ms)
        return StatsResult(
            counts, failures, since_start, dict(metrics.current().received), latency, self._polls()
        )

    def _polls(self) -> dict[str, PollStatus]:
        """Each running poller's state and counters (docs/polling.md)."""
        return {
            name: poller.status()
            for name, poller in self._running.actors.pollers.items()
            if name in self._config.sources
        }

    # -- pause / resume ----------------------------------------------------------------------

    def _pause(self, name: str, *, pause: bool) -> PauseResult:
        config = self._config
        if name in config.sources:
            if name in self._running.actors:  # a poll source: its poller holds the pause
                poller = self._sink(name)
                changed = poller.paused != pause
                if pause:
                    poller.pause()
                else:
                    poller.resume()
                return PauseResult(name, "source", pause, changed)
            if not isinstance(config.sources[name], WebhookSourceConfig):
                raise CommandError(f"source {name!r} cannot be paused")
            sources = self._running.pauses.sources
            changed = (name not in sources) if pause else (name in sources)
            if pause:
                sources.add(name)
            else:
                sources.discard(name)
            return PauseResult(name, "source", pause, changed)
        if name in config.sinks:
            sink = self._sink(name)
            changed = sink.paused != pause
            if pause:
                sink.pause()
            else:
                sink.resume()
            return PauseResult(name, "sink", pause, changed)
        if name in config.transforms:
            raise CommandError(f"{name!r} is a transform; pause its source or its sinks instead")
        raise CommandError(f"no source or sink named {name!r}")

    async def _cluster_pause(self, result: PauseResult) -> PauseResult:
        """In cluster mode, the pause applied here is stored for every node (docs/cluster.md)."""
        node = self._running.cluster
        if node is None:
            return result
        changed = await self._store_call(
            node.coordination.set_paused(result.name, result.paused, node.info.id)
        )
        return msgspec.structs.replace(result, changed=changed)

    # -- dead letters ------------------------------------------------------------------------

    def _selection(self, request: DlqListRequest | DlqRetryRequest | DlqPurgeRequest) -> DeadFilter:
        ids = getattr(request, "ids", ())
        return DeadFilter(
            ids=ids,
            stages=[request.sink] if request.sink else [],
            since=request.since,
            error=request.error,
        )

    async def _retry(self, request: DlqRetryRequest) -> DlqRetryResult:
        # A sink's dead letters are sent again; a transform's (not an aggregating one's) are run
        # through the transform again (`daemon.store.transform_retry`).
        transforms = [name for name, each in self._config.transforms.items() if each.aggregate is None]
        sinks = [*self._config.sinks, *transforms]
        if request.sink is not None and request.sink not in sinks:
            raise CommandError(
                f"no sink or transform named {request.sink!r} "
                "(only a sink's or a transform's dead letters can be retried)"
            )
        if not (request.ids or request.all):
            raise CommandError("name the dead letters to retry by id, or pass all (with filters)")
        selection = self._selection(request)._replace(stages=[request.sink] if request.sink else sinks)
        by_sink = await self._store_call(self._running.store.retry_dead(selection, wake=sinks))
        retried = sum(by_sink.values())
        return DlqRetryResult(retried, by_sink, max(0, len(request.ids) - retried))

    # -- reload ------------------------------------------------------------------------------

    async def _reload(self) -> ReloadResult:
        result = await reload(self._running)
        if not result.applied:
            problems = "".join(f"\n  {error}" for error in result.errors)
            raise CommandError(f"reload refused, nothing changed:{problems}")
        return result

    # -- drain -------------------------------------------------------------------------------

    async def _outstanding(self) -> dict[str, int]:
        config = self._config
        active = [
            name for name in config.sinks if name in self._running.actors and not self._sink(name).paused
        ]
        due = await self._store_call(self._running.store.due_counts(active, time.time()))
        backlog = await self._store_call(
            self._running.store.transform_backlog({n: t.inputs for n, t in config.transforms.items()})
        )
        return {name: count for name, count in {**backlog, **due}.items() if count}

    async def _drain(self, timeout: float, call: Call) -> DrainResult:
        if self._draining:
            raise CommandError("already draining")
        running = self._running
        drain = await self._cluster_drain(timeout)
        self._draining = True
        running.pauses.draining = True
        for name in self._config.sources:
            if name in running.actors:  # a poll source: no new cycle, or the backlog keeps growing
                self._sink(name).pause()
        call.after_answer(running.stop.set)
        began = time.monotonic()
        deadline = began + timeout
        reported: dict[str, int] | None = None
        while True:
            by_stage = await self._outstanding()
            elapsed = round(time.monotonic() - began, 3)
            if not by_stage or time.monotonic() >= deadline:
                break
            if by_stage != reported:
                reported = by_stage
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await call.progress(DrainProgress(elapsed, sum(by_stage.values()), by_stage))
            await trio.sleep(DRAIN_POLL)
        if drain is not None and running.cluster is not None:  # every node that joined it stops
            with contextlib.suppress(StoreUnavailable):  # its deadline ends it anyway
                await running.cluster.coordination.finish_drain(drain)
        return DrainResult(not by_stage, elapsed, sum(by_stage.values()), by_stage)

    async def _cluster_drain(self, timeout: float) -> int | None:
        """In cluster mode, start the drain every node joins (docs/cluster.md); its number."""
        node, follower = self._running.cluster, self._running.follower
        if node is None or follower is None:
            return None
        try:
            drain = await self._store_call(node.coordination.start_drain(node.info.id, timeout))
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        follower.join(drain.number)
        return drain.number

    # -- replay ------------------------------------------------------------------------------

    def _replay_routes(self, source: str, to: str | None) -> dict[str, list[str]]:
        """Each stream to replay (the source, the transforms fed by it) -> the chosen sinks reading it."""
        config = self._config
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
        routes = {
            stream: [sink for sink in chosen if stream in config.sinks[sink].inputs] for stream in reach
        }
        routes = {stream: sinks for stream, sinks in routes.items() if sinks}
        if to is not None and not routes:
            raise CommandError(f"sink {to!r} is not downstream of source {source!r}")
        return routes

    async def _replay(self, request: ReplayRequest, call: Call) -> ReplayResult:
        routes = self._replay_routes(request.source, request.to)
        if request.since is not None and request.until is not None and request.since >= request.until:
            raise CommandError("--since must be before --until")
        sinks = sorted({sink for chosen in routes.values() for sink in chosen})
        store = self._running.store
        selected = await self._store_call(
            store.replay_selection(
                source=request.source, since=request.since, until=request.until, streams=list(routes)
            )
        )
        number = await self._store_call(
            store.start_replay(source=request.source, since=request.since, until=request.until, sinks=sinks)
        )
        by_sink = dict.fromkeys(sinks, 0)
        for start in range(0, len(selected), REPLAY_CHUNK):
            seqs_by_sink: dict[str, list[int]] = {sink: [] for sink in sinks}
            for seq, stream in selected[start : start + REPLAY_CHUNK]:
                for sink in routes[stream]:
                    seqs_by_sink[sink].append(seq)
            created = await self._store_call(
                store.insert_replay(number=number, seqs_by_sink=seqs_by_sink, wake=sinks)
            )
            for sink, count in created.items():
                by_sink[sink] += count
            done = min(start + REPLAY_CHUNK, len(selected))
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await call.progress(ReplayProgress(done, len(selected)))
        return ReplayResult(number, len(selected), sum(by_sink.values()), by_sink)


def _shown_state(actor: ActorState) -> str:
    """An actor's state; `standby` for a cluster singleton running while another node holds its lease."""
    if (
        actor.state == "running"
        and isinstance(actor.incarnation, Singleton)
        and actor.incarnation.role == "standby"
    ):
        return "standby"
    return actor.state


def _summary(result: Any) -> str:
    """A short outcome for the audit trail."""
    match result:
        case PauseResult(name=name, paused=paused, changed=changed):
            return f"{name} {'paused' if paused else 'resumed'}{'' if changed else ' (no change)'}"
        case DlqRetryResult(retried=retried):
            return f"{retried} retried"
        case DlqPurgeResult(purged=purged, dry_run=dry_run):
            return f"{purged} {'would be purged' if dry_run else 'purged'}"
        case ReplayResult(replay=number, events=events, deliveries=deliveries):
            return f"replay {number}: {events} event(s), {deliveries} new deliveries"
        case DrainResult(drained=drained, outstanding=outstanding):
            return "drained" if drained else f"timed out, {outstanding} outstanding"
        case ReloadResult(added=added, changed=changed, removed=removed):
            parts = [
                f"{label} {', '.join(names)}"
                for label, names in (("added", added), ("changed", changed), ("removed", removed))
                if names
            ]
            return "reloaded: " + ("; ".join(parts) or "nothing changed")
    return "done"
