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
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import trio

from . import metrics, outbox
from .commands import Commands, Pauses
from .config import Config, LoadedConfig, WebhookSourceConfig, downstream, webhook_path
from .control import Access, ControlServer, group_id, socket_path
from .errors import StoreUnavailable
from .ingest import IngestBatcher
from .registry import Transformer, WebhookListener, WebhookRoute, build_sink
from .store import Store
from .supervisor import Supervisor
from .systemd import ActivatedSockets, Notifier
from .telemetry import Telemetry

log = logging.getLogger("ferry.daemon")
MAINTENANCE_INTERVAL = 60.0


@dataclass
class Running:
    """What `serve` hands back once every actor has started."""

    addresses: list[tuple[str, int]]
    store: Store
    supervisor: Supervisor
    config: Config
    stop: trio.Event = field(default_factory=trio.Event)
    actors: dict[str, Any] = field(default_factory=dict)
    pauses: Pauses = field(default_factory=Pauses)
    control: ControlServer | None = None


async def _maintain(store: Store, config: Config) -> None:
    readers = {name: transforms for name, (transforms, _) in downstream(config).items()}
    while True:
        await trio.sleep(min(MAINTENANCE_INTERVAL, config.store.retention / 4 or 1))
        removed = await store.call(
            partial(
                outbox.prune,
                retention=config.store.retention,
                archive=config.store.archive,
                dedup_window=config.store.dedup_window,
                readers=readers,
            )
        )
        if removed:
            log.info("store pruned", extra={"fields": {"rows": removed}})


async def _sample_queue_depths(store: Store, stages: list[str], interval: float) -> None:
    """Keep `ferry.queue.depth` fresh: one indexed count per interval, read by the metric reader."""
    while True:
        depths = await store.call(partial(metrics.pending_by_stage, stages=stages))
        metrics.current().queue_depths.update(depths)
        await trio.sleep(interval)


def _control_server(loaded: LoadedConfig, running: Running) -> ControlServer:
    """The control socket, answering through `Commands` (see `daemon.control`)."""
    group = loaded.config.control.group
    gid = group_id(group) if group is not None else None
    commands = Commands(running, loaded)
    return ControlServer(
        socket_path(loaded), commands, access=Access(os.getuid(), gid), refused=commands.refused, group=gid
    )


async def _watch_signals(running: Running, cancel: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if running.stop.is_set():
                log.warning("second signal: stopping now", extra={"fields": {"signal": signum}})
                cancel.cancel()
                return
            log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
            running.stop.set()


class _Tally(Protocol):
    delivered: int
    dead: int


async def _status_line(store: Store, batcher: IngestBatcher, sinks: Iterable[_Tally]) -> str:
    """systemd's `STATUS=`: counters since start plus one indexed count of pending deliveries."""
    delivered = dead = 0
    for sink in sinks:
        delivered, dead = delivered + sink.delivered, dead + sink.dead
    try:
        pending = f"{await store.call(outbox.pending_total)} pending"
    except StoreUnavailable:
        pending = "store unavailable"
    return (
        f"{batcher.events} events received, {delivered} delivered, {dead} dead-lettered since start; "
        + pending
    )


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
    store = Store.open(
        config.store.path, durability=config.store.durability, max_batch=config.store.max_batch
    )
    notifier = Notifier()
    supervisor = Supervisor(config.supervisor)
    wiring = downstream(config)
    telemetry = Telemetry.start(config.telemetry)
    try:
        async with trio.open_nursery() as outer:
            await outer.start(store.run)
            if config.telemetry.metrics:
                outer.start_soon(
                    _sample_queue_depths, store, list(config.sinks), config.telemetry.metrics_interval
                )
            outer.start_soon(_maintain, store, config)
            outer.start_soon(notifier.keep_alive)
            running = Running([], store, supervisor, config)
            if handle_signals:
                outer.start_soon(_watch_signals, running, outer.cancel_scope)
            async with trio.open_nursery() as sinks_nursery:
                sinks = {name: build_sink(name, sink, store) for name, sink in config.sinks.items()}
                for name, sink in sinks.items():
                    await sinks_nursery.start(supervisor.supervise, f"sink.{name}", lambda s=sink: s)
                running.actors.update(sinks)
                running.control = _control_server(loaded, running)
                await outer.start(running.control.run)
                async with trio.open_nursery() as intake:
                    for name, transform in config.transforms.items():
                        actor = Transformer(
                            name, transform, store, transforms=wiring[name][0], sinks=wiring[name][1]
                        )
                        running.actors[name] = actor
                        await intake.start(supervisor.supervise, f"transform.{name}", lambda a=actor: a)
                    routes = {
                        webhook_path(name, source): WebhookRoute(name, source.idempotency_header or None)
                        for name, source in config.sources.items()
                        if isinstance(source, WebhookSourceConfig)
                    }
                    batcher = IngestBatcher(
                        store,
                        sinks={name: sinks for name, (_, sinks) in wiring.items()},
                        consumers={
                            name: [*transforms, *sinks] for name, (transforms, sinks) in wiring.items()
                        },
                        dedup_window=config.store.dedup_window,
                    )
                    await intake.start(supervisor.supervise, "ingest", lambda: batcher)
                    listener = WebhookListener(
                        config.listener,
                        routes,
                        batcher,
                        lambda: supervisor.ready and store.writable,
                        paused=running.pauses.source_paused,
                        listeners=activated.listeners if activated else None,
                    )
                    running.addresses = await intake.start(supervisor.supervise, "listener", lambda: listener)
                    log.info(
                        "ready",
                        extra={
                            "fields": {
                                "listener": [f"{host}:{port}" for host, port in running.addresses],
                                "store": str(store.path),
                                "pid": os.getpid(),
                                "startup_s": round(time.monotonic() - started, 3),
                            }
                        },
                    )
                    notifier.ready(f"serving {len(routes)} webhook source(s)")
                    intake.start_soon(
                        notifier.report_status, partial(_status_line, store, batcher, sinks.values())
                    )
                    task_status.started(running)
                    await running.stop.wait()
                    notifier.stopping(
                        f"stopping: finishing deliveries for up to {config.supervisor.shutdown_grace:g}s"
                    )
                    intake.cancel_scope.cancel()
                for sink in sinks.values():
                    sink.stop()
                sinks_nursery.cancel_scope.deadline = trio.current_time() + config.supervisor.shutdown_grace
            outer.cancel_scope.cancel()
    finally:
        store.close()
        notifier.close()
        activated.close()
        telemetry.shutdown()
    log.info("stopped", extra={"fields": {"uptime_s": round(time.monotonic() - started, 3)}})
