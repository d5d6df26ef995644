"""Assembly: how a config becomes the running daemon's actors.

What every actor is built with (`deps`: the daemon's store, budgets, clock, taps, redactor), where
each one's output goes (`Wiring`, from `downstream`), the listener's routes and the batcher's
fan-out, and the supervisor factories of each kind. Used by `daemon.app` at startup and
`daemon.reload` when a config changes; the kinds' constructors themselves come from
`daemon.registry`.

Incarnations (STYLE.md 5): a transform, a poller and the alerter are built afresh for every
restart after a crash (`incarnations`): a new object from the config it was built from, handed
what outlives a crash (its counters since start; a poller's pause) and shown to `ferry ctl` in
its place, so nothing a crash left half-done in memory survives it. Their position, windows and
states are read back from the store by `run`. Sinks still restart as the same object (`_same`,
see `daemon.supervisor`); the listener and the ingest batcher are the daemon's intake, rewired
in place by a reload, and restart as the same object too.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from daemon.component import Deps, Wiring
from daemon.config.kinds import PollSourceConfig, WebhookSourceConfig, webhook_path
from daemon.config.root import Config, downstream
from daemon.registry import (
    Aggregator,
    Alerter,
    Poller,
    Snapshot,
    Transformer,
    WebhookRoute,
    build_poller,
    build_transform,
    build_verifier,
    cluster_view,
    flatten,
    publish_forever,
)
from daemon.supervisor import Actor

if TYPE_CHECKING:
    from daemon.running import Running

A = TypeVar("A")


def routes(config: Config) -> dict[str, WebhookRoute]:
    """The listener's routes: URL path → webhook source."""
    return {
        webhook_path(name, source): WebhookRoute(
            name,
            source.idempotency_header or None,
            build_verifier(source.verify, f"$.sources.{name}.verify") if source.verify else None,
        )
        for name, source in config.sources.items()
        if isinstance(source, WebhookSourceConfig)
    }


def fan_out(config: Config) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The ingest batcher's maps: producer → sinks it feeds, producer → consumers to wake."""
    wiring = downstream(config)
    sinks = {name: sinks for name, (_, sinks) in wiring.items()}
    consumers = {name: [*transforms, *sinks] for name, (transforms, sinks) in wiring.items()}
    return sinks, consumers


def pollers(config: Config, names: list[str] | None = None) -> list[str]:
    """The poll sources among `names` (default: every source)."""
    chosen = config.sources if names is None else names
    return [name for name in chosen if isinstance(config.sources.get(name), PollSourceConfig)]


def deps(config: Config, running: Running) -> Deps:
    """What every actor of `config` is built with in this running daemon."""
    return Deps(
        running.store,
        running.rate_limits,
        quarantine_after=config.supervisor.quarantine_after,
        dedup_window=config.store.dedup_window,
        clock=running.clock,
        taps=running.taps,
        redaction=running.redaction,
    )


def poller(config: Config, name: str, running: Running) -> Poller:
    source = config.sources[name]
    assert isinstance(source, PollSourceConfig)
    return build_poller(name, source, deps(config, running), Wiring(*downstream(config)[name]))


def build_alerter(config: Config, running: Running) -> Alerter:
    """The alerter for `config`'s rules, reading the running daemon's metrics."""
    telemetry = running.telemetry
    assert telemetry is not None
    telemetry.start_collecting()  # metrics are collected only while alert rules read them
    node = running.cluster
    return Alerter(
        config,
        running.store,
        lambda: flatten(telemetry.collect()),
        clock=running.clock,
        service=config.telemetry.service_name,
        cluster=None
        if node is None
        else cluster_view(node.coordination.cluster_metrics, node.info.id, config.alerting.interval),
    )


async def publish_metrics(running: Running) -> None:
    """Cluster mode: this node's metrics to the shared database every `[alerting] interval` while
    alert rules exist, so the alerter, wherever it runs, evaluates them on the whole cluster's."""
    node, telemetry = running.cluster, running.telemetry
    if node is None or telemetry is None:
        return

    def collect() -> Snapshot | None:
        if not running.config.alerts:
            return None
        telemetry.start_collecting()
        return flatten(telemetry.collect())

    await publish_forever(
        partial(node.coordination.publish_metrics, node.info.id),
        collect,
        lambda: running.config.alerting.interval,
    )


def transformer(config: Config, name: str, running: Running) -> Transformer | Aggregator:
    """The actor of one transform: an `Aggregator` when it has `aggregate`, else a `Transformer`."""
    wiring = Wiring(*downstream(config)[name])
    return build_transform(name, config.transforms[name], deps(config, running), wiring)


def same(actor: Actor) -> Callable[[], Actor]:
    """A supervisor factory that restarts the same object: sinks, the listener, the batcher."""
    return lambda: actor


def incarnations(
    first: A, build: Callable[[], A], carry: Callable[[A, A], None], publish: Callable[[A, A], None]
) -> Callable[[], A]:
    """A supervisor factory of fresh incarnations (see `daemon.supervisor`): `first` for the first
    run, then for each restart a new actor from `build()` (the config it was built from, the
    daemon's current deps), handed what outlives a crash by `carry(previous, new)` and shown to
    `ferry ctl` by `publish(previous, new)`."""
    current = first
    runs = 0

    def factory() -> A:
        nonlocal current, runs
        if runs:
            previous, current = current, build()
            carry(previous, current)
            publish(previous, current)
        runs += 1
        return current

    return factory


def _in(held: dict[str, A], name: str) -> Callable[[A, A], None]:
    """Put a new incarnation in `held[name]`, unless a reload has put a replacement there meanwhile."""

    def publish(previous: A, new: A) -> None:
        if held.get(name) is previous:
            held[name] = new

    return publish


def transform_factory(
    config: Config, name: str, running: Running, first: Transformer | Aggregator
) -> Callable[[], Actor]:
    """Fresh incarnations of transform `name` of `config`, starting with `first`."""
    build = partial(transformer, config, name, running)
    return incarnations(first, build, _carry_transform, _in(running.actors.transforms, name))


def poller_factory(config: Config, name: str, running: Running, first: Poller) -> Callable[[], Actor]:
    """Fresh incarnations of poll source `name` of `config`, starting with `first`."""
    build = partial(poller, config, name, running)
    return incarnations(
        first, build, lambda previous, new: new.inherit(previous), _in(running.actors.pollers, name)
    )


def alerter_factory(config: Config, running: Running, first: Alerter) -> Callable[[], Actor]:
    """Fresh incarnations of the alerter (its rules' states are read back from the store)."""

    def publish(previous: Alerter, new: Alerter) -> None:
        if running.alerter is previous:
            running.alerter = new

    return incarnations(first, partial(build_alerter, config, running), lambda previous, new: None, publish)


def _carry_transform(previous: Transformer | Aggregator, new: Transformer | Aggregator) -> None:
    """A transform's counters pass to its next incarnation (the same kind: the same config built it)."""
    if isinstance(new, Transformer):
        if isinstance(previous, Transformer):
            new.inherit(previous)
    elif isinstance(previous, Aggregator):
        new.inherit(previous)
