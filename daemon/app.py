"""`serve(config)`: the whole daemon in one nursery tree.

Shutdown is nesting:

    outer nursery        store writer, maintenance, signals, watchdog, control socket
      sinks nursery      one supervised Sink per sink
        intake nursery   the webhook listener and the transformers

SIGTERM/SIGINT cancel the intake nursery first (no new requests are accepted;
requests waiting for a commit are dropped unacknowledged), then ask every sink
to stop fetching and give in-flight deliveries `shutdown_grace` to finish.
Whatever is left stays pending in the store and resumes on the next start.
A second signal cuts the grace short.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from typing import Protocol

import trio

from daemon.assembly import (
    alerter_factory,
    build_alerter,
    deps,
    fan_out,
    poller,
    poller_factory,
    pollers,
    publish_metrics,
    routes,
    transform_factory,
    transformer,
)
from daemon.cluster.control import Follower
from daemon.cluster.node import open_node
from daemon.cluster.singleton import leased, under_lease
from daemon.config.kinds import PollSourceConfig
from daemon.config.root import Config, LoadedConfig, downstream, node_id
from daemon.control.commands import Commands
from daemon.control.server import Access, ControlServer, group_id, socket_path
from daemon.errors import StoreUnavailable
from daemon.limits.ratelimit import RateLimits
from daemon.registry import IngestBatcher, WebhookListener, build_sink, server_context
from daemon.reload import reload
from daemon.running import Running
from daemon.store import at_rest
from daemon.store.api import Outbox
from daemon.store.pg_budgets import PgBudgets
from daemon.store.postgres.connect import describe
from daemon.store.postgres.listener import WakeListener
from daemon.store.postgres.store import PostgresStore
from daemon.store.sqlite import Store
from daemon.supervisor import Supervisor
from daemon.systemd import ActivatedSockets, Notifier
from daemon.telemetry import masking, metrics
from daemon.telemetry.otel import Telemetry
from daemon.telemetry.throughput import Throughput

log = logging.getLogger("ferry.daemon")
MAINTENANCE_INTERVAL = 60.0


async def _maintain(store: Outbox, running: Running) -> None:
    """Prune the store every `MAINTENANCE_INTERVAL` (or `retention / 4`, when shorter).

    Who reads which stream is taken from the config current when a prune starts, after the
    sleep: a reload during the sleep that adds a transform keeps the events it has yet to read.
    """
    while True:
        await trio.sleep(min(MAINTENANCE_INTERVAL, running.config.store.retention / 4 or 1))
        config = running.config  # a reload may change who reads what
        readers = {name: transforms for name, (transforms, _) in downstream(config).items()}
        # A failed aggregation window's contents (`NAME/windows`, daemon/store/windows.py) have no reader.
        readers |= {f"{name}/windows": [] for name, t in config.transforms.items() if t.aggregate is not None}
        removed = await store.prune(
            retention=config.store.retention,
            archive=config.store.archive,
            dedup_window=config.store.dedup_window,
            readers=readers,
            audit_retention=config.store.audit_retention,
        )
        if removed:
            log.info("store pruned", extra={"fields": {"rows": removed}})


class _Maintenance:
    """`_maintain` as an actor, so that a cluster runs it under a lease."""

    def __init__(self, store: Outbox, running: Running) -> None:
        self._store, self._running = store, running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await _maintain(self._store, self._running)


async def _sample_queue_depths(store: Outbox, running: Running, telemetry: Telemetry) -> None:
    """Keep `ferry.queue.depth` fresh: one indexed count per interval, read by the metric reader.

    The interval is the metrics interval, or the alert interval when rules are configured and it
    is shorter (a backlog rule must not read a count older than its own interval). Nothing is
    counted while no reader reads metrics (a reload adding alert rules may start one).
    """
    while True:
        config = running.config
        interval = config.telemetry.metrics_interval
        if config.alerts:
            interval = min(interval, config.alerting.interval)
        if not telemetry.metrics_live:
            await trio.sleep(interval)
            continue
        depths = await store.pending_by_stage(running.config.sinks)
        gauges = running.metrics.queue_depths
        gauges.clear()  # a sink removed by a reload stops being reported
        gauges.update(depths)
        await trio.sleep(interval)


def _control_server(loaded: LoadedConfig, running: Running) -> ControlServer:
    """The control socket, answering through `Commands` (see `daemon.control`)."""
    group = loaded.config.control.group
    gid = group_id(group) if group is not None else None
    commands = Commands(running, loaded, wall=running.clock)
    return ControlServer(
        socket_path(loaded), commands, access=Access(os.getuid(), gid), refused=commands.refused, group=gid
    )


async def _join_cluster(running: Running, nursery: trio.Nursery) -> None:
    """Cluster mode (PostgreSQL store): start this node's heartbeat, which keeps its leases and
    applies the cluster's pauses and drain (docs/cluster.md). Nothing on one SQLite node."""
    node = open_node(running.config)
    if node is None:
        return
    running.cluster = node
    running.follower = node.on_beat = Follower(
        sinks=lambda: running.actors.sinks,
        pollers=lambda: running.actors.pollers,
        webhooks=lambda: {
            n for n, s in running.config.sources.items() if not isinstance(s, PollSourceConfig)
        },
        holds=running.pauses,
        stop=running.stop,
        wake=partial(_wake_consumers, running),
    )
    await nursery.start(node.run)
    # Other nodes' commits wake this node's consumers at once; the heartbeat's wake-up stays as
    # the fallback for a notification missed (docs/cluster.md#work-written-by-other-nodes).
    url = running.config.store.url
    if url is not None:
        listener = WakeListener(url.value.reveal(), node=node.info.id, wake=partial(_wake_consumers, running))
        running.wake_listener = listener
        await nursery.start(listener.run)


def _wake_consumers(running: Running, names: frozenset[str] | None = None) -> None:
    """Wake the transforms and sinks here named in `names` (all of them when None): they look
    for work other nodes committed."""
    for name in (*running.config.transforms, *running.config.sinks):
        if names is None or name in names:
            running.store.signal(name).fire()


async def _watch_signals(running: Running, nursery: trio.Nursery) -> None:
    """SIGTERM/SIGINT stop the daemon (a second one at once); SIGHUP reloads the config."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("reloading", extra={"fields": {"signal": "SIGHUP"}})
                nursery.start_soon(reload, running)
                continue
            if running.stop.is_set():
                log.warning("second signal: stopping now", extra={"fields": {"signal": signum}})
                nursery.cancel_scope.cancel()
                return
            log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
            running.stop.set()


class _Tally(Protocol):
    delivered: int
    dead: int


def _totals(running: Running) -> tuple[int, int]:
    """(events received, deliveries delivered) since start, for `Throughput`."""
    received = running.batcher.events if running.batcher is not None else 0
    # Pollers count the items they stored (`Poller.items`); webhook sources go through the batcher.
    received += sum(poller.items for poller in running.actors.pollers.values())
    return received, sum(sink.delivered for sink in running.sinks)


def _serving(config: Config) -> str:
    """systemd's `STATUS=` at `READY=1`, e.g. `serving 2 webhook and 1 poll source(s)`."""
    kinds = Counter(
        "poll" if isinstance(source, PollSourceConfig) else "webhook" for source in config.sources.values()
    )
    if not kinds:
        return "serving no sources"
    return (
        "serving "
        + " and ".join(f"{kinds[kind]} {kind}" for kind in ("webhook", "poll") if kinds[kind])
        + " source(s)"
    )


async def _status_line(running: Running, store: Outbox, sinks: Callable[[], Iterable[_Tally]]) -> str:
    """systemd's `STATUS=`: counters since start plus one indexed count of pending deliveries.

    Events received count webhook requests stored and items poll sources stored.
    """
    received = _totals(running)[0]
    delivered = dead = 0
    for sink in sinks():
        delivered, dead = delivered + sink.delivered, dead + sink.dead
    try:
        pending = f"{await store.pending_total()} pending"
    except StoreUnavailable:
        pending = "store unavailable"
    return f"{received} events received, {delivered} delivered, {dead} dead-lettered since start; " + pending


def open_store(config: Config) -> Store | PostgresStore:
    """The outbox `[store]` names, opened (and migrated); raises `StoreError` if it cannot be used.

    PostgreSQL: this node claims deliveries as `node_id(config)` for `[cluster] delivery_lease`.
    """
    cipher = at_rest.build_cipher(config.store.encryption)
    if config.store.backend == "postgres":
        assert config.store.url is not None  # checked by the config (required with postgres)
        return PostgresStore.open(
            config.store.url.value.reveal(),
            node=node_id(config),
            lease=config.cluster.delivery_lease,
            max_batch=config.store.max_batch,
            cipher=cipher,
        )
    return Store.open(
        config.store.path,
        durability=config.store.durability,
        max_batch=config.store.max_batch,
        cipher=cipher,
        verify=config.store.verify_on_start,
    )


def shared_budgets(config: Config) -> PgBudgets | None:
    """Where `[rate_limits]` budgets are kept: the PostgreSQL database every node shares (on a
    connection of its own, docs/limits.md#cluster-wide-budgets), or None on SQLite (in memory)."""
    if config.store.backend != "postgres":
        return None
    assert config.store.url is not None  # checked by the config (required with postgres)
    return PgBudgets(config.store.url.value.reveal())


def _where(store: Store | PostgresStore) -> str:
    """The store as a log line names it (never a password)."""
    return str(store.path) if isinstance(store, Store) else f"{describe(store.url)} as {store.node}"


async def serve(
    loaded: LoadedConfig,
    *,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until SIGTERM/SIGINT (or `running.stop` is set); see the module docstring.

    Raises `StoreError` if the database cannot be used and `TooManyRestarts`
    if actors keep crashing.
    """
    config = loaded.config
    started = time.monotonic()
    activated = ActivatedSockets.from_environment()
    store = open_store(config)
    notifier = Notifier()
    supervisor = Supervisor(config.supervisor)
    # The daemon's instruments, in this task's context and every task started from it (nothing
    # process-wide). Only the alerter reads `collect()`; a reload that adds rules starts collecting
    # then (reload.py).
    instruments = metrics.install(metrics.Metrics())
    telemetry = Telemetry.start(config.telemetry, collect=bool(config.alerts), metrics=instruments)
    budgets = shared_budgets(config)
    try:
        async with trio.open_nursery() as outer:
            await outer.start(store.run)
            running = Running(
                [], store, supervisor, config, loaded=loaded, notifier=notifier, metrics=instruments
            )
            running.redaction.redactor = masking.config_redactor(config)
            running.rate_limits = RateLimits(wall=running.clock, budgets=budgets)
            running.rate_limits.update(config.rate_limits)
            outer.start_soon(_sample_queue_depths, store, running, telemetry)
            await _join_cluster(running, outer)
            # Pruning: one node of a cluster at a time (the others would repeat its deletes).
            outer.start_soon(under_lease(running.cluster, "maintenance", _Maintenance(store, running)).run)
            running.throughput = Throughput(lambda: _totals(running))
            outer.start_soon(running.throughput.run)
            outer.start_soon(notifier.keep_alive)
            if handle_signals:
                outer.start_soon(_watch_signals, running, outer)
            async with trio.open_nursery() as sinks_nursery:
                sinks = {
                    name: build_sink(name, sink, deps(config, running)) for name, sink in config.sinks.items()
                }
                for name, sink in sinks.items():
                    await sinks_nursery.start(supervisor.supervise, f"sink.{name}", lambda s=sink: s)
                running.actors.sinks.update(sinks)
                running.control = _control_server(loaded, running)
                await outer.start(running.control.run)
                async with trio.open_nursery() as intake:
                    node = running.cluster  # singletons run under their lease in a cluster
                    for name in config.transforms:
                        actor = transformer(config, name, running)
                        running.actors.transforms[name] = actor
                        await intake.start(
                            supervisor.supervise,
                            f"transform.{name}",
                            leased(
                                node, f"transform.{name}", transform_factory(config, name, running, actor)
                            ),
                        )
                    for name in pollers(config):
                        source = poller(config, name, running)
                        running.actors.pollers[name] = source
                        await intake.start(
                            supervisor.supervise,
                            f"poll.{name}",
                            leased(node, f"poll.{name}", poller_factory(config, name, running, source)),
                        )
                    running.telemetry = telemetry
                    if node is not None:  # the alerter evaluates rules on every node's metrics
                        intake.start_soon(publish_metrics, running)
                    if config.alerts:
                        running.alerter = alerter = build_alerter(config, running)
                        await intake.start(
                            supervisor.supervise,
                            "alerter",
                            leased(node, "alerter", alerter_factory(config, running, alerter)),
                        )
                    sink_map, consumers = fan_out(config)
                    batcher = IngestBatcher(
                        store,
                        sinks=sink_map,
                        consumers=consumers,
                        dedup_window=config.store.dedup_window,
                        taps=running.taps,
                        clock=running.clock,
                    )
                    await intake.start(supervisor.supervise, "ingest", lambda: batcher)
                    listener = WebhookListener(
                        config.listener,
                        routes(config),
                        batcher,
                        lambda: supervisor.ready and store.writable,
                        paused=running.pauses.source_paused,
                        overloaded=lambda: batcher.waiting >= config.listener.max_pending,
                        listeners=activated.listeners if activated else None,
                        metrics_page=telemetry.prometheus_text,
                        tls=server_context(config.listener.tls),
                        clock=running.clock,
                    )
                    running.addresses = await intake.start(supervisor.supervise, "listener", lambda: listener)
                    if node is not None and running.addresses:
                        host, port = running.addresses[0]
                        node.info = node.info._replace(address=f"{host}:{port}")
                    log.info(
                        "ready",
                        extra={
                            "fields": {
                                "listener": [f"{host}:{port}" for host, port in running.addresses],
                                "store": _where(store),
                                "pid": os.getpid(),
                                "startup_s": round(time.monotonic() - started, 3),
                            }
                        },
                    )
                    running.sinks_nursery, running.intake_nursery = sinks_nursery, intake
                    running.batcher, running.listener = batcher, listener
                    notifier.ready(_serving(config))
                    intake.start_soon(
                        notifier.report_status, partial(_status_line, running, store, lambda: running.sinks)
                    )
                    task_status.started(running)
                    await running.stop.wait()
                    notifier.stopping(
                        f"stopping: finishing deliveries for up to {config.supervisor.shutdown_grace:g}s"
                    )
                    async with running.reload_lock:  # a reload under way finishes first; none starts after
                        intake.cancel_scope.cancel()
                for sink in running.sinks:
                    sink.stop()
                sinks_nursery.cancel_scope.deadline = trio.current_time() + config.supervisor.shutdown_grace
            outer.cancel_scope.cancel()
    finally:
        store.close()
        if budgets is not None:
            budgets.close()
        notifier.close()
        activated.close()
        telemetry.shutdown()
    log.info("stopped", extra={"fields": {"uptime_s": round(time.monotonic() - started, 3)}})
