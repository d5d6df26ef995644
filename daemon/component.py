"""How a component kind registers with the runtime: its `Kind` (the `type` name, its config struct,
its constructor) and the `Deps` and `Wiring` every constructor is handed.

Each kind defines its `Kind` in its own package (`actors/KIND/kind.py`), next to its config struct;
`daemon.registry` maps `type` names to them and is the one runtime module that imports actors.
Constructors build an actor and start nothing: the supervisor runs it (`run(task_status=…)`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, NamedTuple, TypeVar

from daemon.limits.ratelimit import RateLimits
from daemon.store.api import Outbox
from daemon.telemetry.masking import Masking
from daemon.telemetry.tap import Taps

C = TypeVar("C")
A = TypeVar("A")


@dataclass(frozen=True)
class Deps:
    """What the runtime hands every constructor: the shared parts of one running daemon."""

    store: Outbox
    rate_limits: RateLimits
    """Every `[rate_limits.NAME]` budget; a component takes a limiter for the one it names."""
    quarantine_after: int = 3
    """`[supervisor] quarantine_after`: crashes on one event before it is dead-lettered as poison."""
    dedup_window: float = 86400.0
    """`[store] dedup_window` in seconds: how long an idempotency key is remembered."""
    clock: Callable[[], float] = time.time
    """The wall clock (epoch seconds) time-based actors read; tests hand one that a `MockClock` moves."""
    taps: Taps = field(default_factory=Taps)
    """The daemon's live taps (`ferry ctl tap`), which actors publish to after each commit."""
    redaction: Masking = field(default_factory=Masking)
    """The daemon's redactor (`[telemetry] mask`, secrets), swapped by a reload: what actors hide."""


class Wiring(NamedTuple):
    """Where one producer's output goes: the transforms and the sinks that read it (for a sink: none)."""

    transforms: Sequence[str] = ()
    sinks: Sequence[str] = ()


NO_WIRING: Final = Wiring()
"""A sink's wiring: nothing reads a sink's output."""


@dataclass(frozen=True)
class Kind(Generic[C, A]):
    """One component kind: `tag` (its `type = …` name in the config; `""` for untagged transforms),
    its config struct and its constructor."""

    tag: str
    config: type[C]
    build: Callable[[str, C, Deps, Wiring], A]

    def create(self, name: str, config: object, deps: Deps, wiring: Wiring = NO_WIRING) -> A:
        """The actor for component `name`; `TypeError` if `config` is not this kind's struct."""
        if not isinstance(config, self.config):
            raise TypeError(f"{name}: a {type(config).__name__} is not a {self.config.__name__}")
        return self.build(name, config, deps, wiring)
