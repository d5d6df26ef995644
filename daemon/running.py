"""What a running daemon is made of: the state `serve` hands back and `ferry ctl` and reload work on.

Its own module so that the control commands and reload can name it without importing `app`
(which imports them): `app` builds a `Running`, the others only read and swap its parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from daemon.config.root import Config, LoadedConfig
from daemon.control.server import ControlServer
from daemon.limits.ratelimit import RateLimits
from daemon.registry import Alerter, IngestBatcher, WebhookListener
from daemon.store.sqlite import Store
from daemon.supervisor import Supervisor
from daemon.systemd import Notifier
from daemon.telemetry.otel import Telemetry
from daemon.telemetry.throughput import Throughput


@dataclass
class Pauses:
    """Which webhook sources are paused, and whether the daemon is draining (every source paused)."""

    sources: set[str] = field(default_factory=set)
    draining: bool = False

    def source_paused(self, source: str) -> bool:
        return self.draining or source in self.sources


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

    @property
    def sinks(self) -> list[Any]:
        """The sink actors of the current config."""
        return [self.actors[name] for name in self.config.sinks if name in self.actors]
