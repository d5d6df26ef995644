"""What a running daemon is made of: the state `serve` hands back and `ferry ctl` and reload work on.

Its own module so that the control commands and reload can name it without importing `app`
(which imports them): `app` builds a `Running`, the others only read and swap its parts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from daemon.cluster.control import Follower
from daemon.cluster.node import Node
from daemon.config.root import Config, LoadedConfig
from daemon.control.server import ControlServer
from daemon.limits.ratelimit import RateLimits
from daemon.registry import Aggregator, Alerter, IngestBatcher, Poller, Sink, Transformer, WebhookListener
from daemon.store.api import Outbox
from daemon.store.postgres.listener import WakeListener
from daemon.supervisor import Supervisor
from daemon.systemd import Notifier
from daemon.telemetry.masking import Masking
from daemon.telemetry.metrics import Metrics
from daemon.telemetry.otel import Telemetry
from daemon.telemetry.tap import Taps
from daemon.telemetry.throughput import Throughput


@dataclass
class Pauses:
    """Which webhook sources are paused, and whether the daemon is draining (every source paused)."""

    sources: set[str] = field(default_factory=set)
    draining: bool = False

    def source_paused(self, source: str) -> bool:
        return self.draining or source in self.sources


@dataclass
class Actors:
    """The component actors of the current config, by name and by kind.

    Typed by what reload and the control commands need of each kind: a sink's counters, guard and
    pause; a poller's status, item count and pause; a transform only exists (the supervisor reports
    its state). A webhook source has no actor of its own (it is a route of the listener).
    """

    sinks: dict[str, Sink] = field(default_factory=dict)
    transforms: dict[str, Transformer | Aggregator] = field(default_factory=dict)
    pollers: dict[str, Poller] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.sinks or name in self.transforms or name in self.pollers

    def pausable(self, name: str) -> Sink | Poller:
        """The sink or poller called `name` (`KeyError` if there is none): what `pause` holds."""
        sink = self.sinks.get(name)
        return sink if sink is not None else self.pollers[name]

    def remove(self, name: str) -> None:
        """Forget the actor called `name`, whatever its kind (nothing if there is none)."""
        self.sinks.pop(name, None)
        self.transforms.pop(name, None)
        self.pollers.pop(name, None)


@dataclass
class Running:
    """What `serve` hands back once every actor has started."""

    addresses: list[tuple[str, int]]
    store: Outbox
    supervisor: Supervisor
    config: Config
    stop: trio.Event = field(default_factory=trio.Event)
    actors: Actors = field(default_factory=Actors)
    pauses: Pauses = field(default_factory=Pauses)
    control: ControlServer | None = None
    loaded: LoadedConfig = field(kw_only=True)
    """The config file as last loaded (at startup or by a reload)."""
    notifier: Notifier = field(kw_only=True)
    reload_lock: trio.Lock = field(default_factory=trio.Lock)
    # What a reload swaps or starts actors into; set once every actor has started.
    sinks_nursery: trio.Nursery | None = None
    intake_nursery: trio.Nursery | None = None
    batcher: IngestBatcher | None = None
    listener: WebhookListener | None = None
    throughput: Throughput | None = None
    rate_limits: RateLimits = field(default_factory=RateLimits)
    """Every `[rate_limits.NAME]` budget, shared by all its users; a reload updates it in place."""
    telemetry: Telemetry | None = None
    alerter: Alerter | None = None
    taps: Taps = field(default_factory=Taps)
    """This daemon's live taps (`ferry ctl tap`); every actor publishes to it."""
    redaction: Masking = field(default_factory=Masking)
    """This daemon's redactor (`serve` builds it from the config, a reload swaps it); actors hold it."""
    clock: Callable[[], float] = time.time
    """This daemon's wall clock (epoch seconds), handed to every time-based component (`Deps.clock`)."""
    metrics: Metrics = field(default_factory=Metrics)
    """This daemon's instruments (`metrics.current()` in its tasks); telemetry binds them to a meter."""
    cluster: Node | None = None
    """This node of a cluster (PostgreSQL store), or None on one SQLite node (docs/cluster.md)."""
    follower: Follower | None = None
    """What applies the cluster's pauses and drain here (cluster mode only)."""
    wake_listener: WakeListener | None = None
    """What wakes this node's consumers when another node commits work for them (cluster mode)."""

    @property
    def sinks(self) -> list[Sink]:
        """The sink actors of the current config."""
        return [self.actors.sinks[name] for name in self.config.sinks if name in self.actors.sinks]
