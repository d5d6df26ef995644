"""Runs every actor and restarts the ones that crash (Erlang's one_for_one).

Restart policy:
    An actor whose `run` raises is logged with its traceback, counted, and
    started again — `factory()` is called and what it returns is run — after an
    exponential backoff with jitter (`initial_backoff` doubling to
    `max_backoff`; the streak resets once an incarnation has run for
    `max_backoff`). Other actors are not touched: a crashing sink never stops
    ingest or another sink. More than `max_restarts` restarts (all actors
    together) within `window` raises `TooManyRestarts`, which ends the daemon
    with a non-zero exit so that systemd restarts the whole process.

    An actor that returns normally has finished on purpose and is not restarted.

    What an incarnation is: each restart runs what `factory()` returns then. The supervisor
    hands an actor nothing (no channels, no clones of them; actors meet through the store and
    its wake-up `Signal`s). The daemon's factories (`daemon.assembly`) build a fresh transform,
    poller or alerter for each restart, handed what outlives a crash (counters since start, a
    poller's pause) and shown to `ferry ctl` in the old one's place; its position, windows and
    states are read back from the store. Sinks, the listener and the ingest batcher restart as the
    same object (`assembly.same`): a new `run()` rebuilds what `run` holds (nursery, channels,
    HTTP client, position), while what the object holds (counters, a sink's pause and guard, the
    listener's routes) carries over.

Readiness:
    `await nursery.start(supervisor.supervise, name, factory)` returns once the
    first incarnation has called `task_status.started()`; `ready` is true once every
    supervised actor has started (readiness is about startup: a sink crash-looping
    later must not turn webhooks away, since ingest is durable without it);
    `healthy` is true while every actor is running.

Stopping one actor:
    Each supervised actor runs in its own cancel scope, so a reload can stop it
    alone: `await supervisor.stop(name, grace=…)` calls the incarnation's `stop()`
    (if it has one, e.g. a sink finishing what it holds), cancels it once `grace` has
    passed, waits until it has ended and forgets it. `supervisor.start(nursery, name,
    factory)` adds an actor to a nursery that is already running, without waiting for it
    to start (`await supervisor.started(name, timeout)` does). A name is supervised at
    most once at a time: stop the old actor before starting its replacement.

Cancellation:
    `trio.Cancelled` is never caught: cancelling the nursery stops every actor.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, final

import trio

from daemon.config.sections import SupervisorConfig
from daemon.errors import TooManyRestarts
from daemon.limits.backoff import ceiling
from daemon.telemetry import metrics

log = logging.getLogger("ferry.supervisor")


class Actor(Protocol):
    """What the supervisor runs: one `run` that calls `task_status.started()` once ready."""

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None: ...


@dataclass
class ActorState:
    """What the supervisor knows about one actor (shown by `ferry ctl status`)."""

    name: str
    state: str = "starting"  # starting | running | backoff | stopped
    restarts: int = 0
    last_error: str | None = None
    started_at: float | None = None
    incarnation: Any = field(default=None, repr=False)
    first_start: trio.Event = field(default_factory=trio.Event, repr=False)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope, repr=False)
    ended: trio.Event = field(default_factory=trio.Event, repr=False)


def describe(exc: BaseException) -> str:
    """`Type: message` of an error, or of each leaf of an exception group (nurseries wrap errors)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


class _StartedRelay:
    """Passes the first incarnation's `started()` on to the caller of `supervise`."""

    def __init__(self, outer: Any, state: ActorState) -> None:
        self._outer = outer
        self._state = state

    def started(self, value: Any = None) -> None:
        self._state.state = "running"
        self._state.started_at = trio.current_time()
        self._state.first_start.set()
        if self._outer is not None:
            outer, self._outer = self._outer, None
            outer.started(value)


@final
class Supervisor:
    """Keeps actors running under one restart budget. See the module docstring for the policy."""

    def __init__(self, config: SupervisorConfig, *, rng: Callable[[], float] = random.random) -> None:
        self._config = config
        self._rng = rng
        self._restarts: deque[float] = deque()
        self.actors: dict[str, ActorState] = {}

    @property
    def ready(self) -> bool:
        """Every actor has started at least once (a later crash-restart does not stop intake)."""
        return bool(self.actors) and all(a.started_at is not None for a in self.actors.values())

    @property
    def healthy(self) -> bool:
        """Every actor is running (or has finished on purpose) right now."""
        return bool(self.actors) and all(a.state in ("running", "stopped") for a in self.actors.values())

    @property
    def total_restarts(self) -> int:
        return sum(a.restarts for a in self.actors.values())

    def backoff(self, streak: int) -> float:
        """Delay before restart number `streak` (1-based) of one actor: half fixed, half jitter."""
        limit = ceiling(streak, self._config.initial_backoff, self._config.max_backoff)
        return limit / 2 + self._rng() * limit / 2

    async def supervise(
        self,
        name: str,
        factory: Callable[[], Actor],
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run `factory().run` until it returns or `stop(name)`, restarting it whenever it raises."""
        await self._run(self._register(name), factory, task_status)

    def start(self, nursery: trio.Nursery, name: str, factory: Callable[[], Actor]) -> ActorState:
        """Supervise `name` in `nursery` (already running) without waiting for it to start."""
        state = self._register(name)
        nursery.start_soon(self._run, state, factory, trio.TASK_STATUS_IGNORED)
        return state

    async def started(self, name: str, timeout: float) -> bool:
        """Wait up to `timeout` seconds for `name`'s first incarnation to start; whether it has."""
        with trio.move_on_after(timeout):
            await self.actors[name].first_start.wait()
        return self.actors[name].first_start.is_set()

    async def stop(self, name: str, *, grace: float = 0.0) -> None:
        """Stop `name` for good and forget it; see "Stopping one actor" in the module docstring.

        A running incarnation with a `stop()` method is asked to finish and cancelled after
        `grace` seconds; any other (starting, in backoff, or without `stop()`) is cancelled now.
        """
        state = self.actors[name]
        finish = getattr(state.incarnation, "stop", None)
        if grace > 0 and state.state == "running" and callable(finish):
            finish()
            state.scope.deadline = min(state.scope.deadline, trio.current_time() + grace)
        else:
            state.scope.cancel()
        await state.ended.wait()
        if self.actors.get(name) is state:
            del self.actors[name]

    def _register(self, name: str) -> ActorState:
        if name in self.actors:
            raise ValueError(f"{name} is already supervised; stop it first")
        state = self.actors[name] = ActorState(name)
        return state

    async def _run(self, state: ActorState, factory: Callable[[], Actor], task_status: Any) -> None:
        relay = _StartedRelay(task_status, state)
        streak = 0
        try:
            with state.scope:
                while True:
                    actor = factory()
                    state.incarnation = actor
                    state.state = "starting"
                    began = trio.current_time()
                    try:
                        await actor.run(task_status=relay)
                    except Exception as exc:
                        ran_for = trio.current_time() - began
                        streak = 1 if ran_for >= self._config.max_backoff else streak + 1
                        self._count_restart(state.name, state, exc)
                        state.state = "backoff"
                        await trio.sleep(self.backoff(streak))
                    else:
                        state.state = "stopped"
                        return
            if state.scope.cancelled_caught:
                state.state = "stopped"
        finally:
            state.ended.set()

    def _count_restart(self, name: str, state: ActorState, exc: Exception) -> None:
        state.restarts += 1
        state.last_error = describe(exc)
        metrics.current().restarts.add(1, {"actor": name})
        now = trio.current_time()
        self._restarts.append(now)
        while self._restarts and self._restarts[0] < now - self._config.window:
            self._restarts.popleft()
        log.error(
            "actor crashed",
            exc_info=exc,
            extra={"fields": {"actor": name, "restarts": state.restarts, "error": state.last_error}},
        )
        if len(self._restarts) > self._config.max_restarts:
            raise TooManyRestarts(
                f"{len(self._restarts)} actor restarts within {self._config.window:g}s "
                f"(max_restarts = {self._config.max_restarts}); last: {name}: {state.last_error}"
            ) from exc
