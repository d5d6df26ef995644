"""Reload: re-read the config file the daemon was started with and apply what changed.

`ferry ctl reload` and SIGHUP (`systemctl reload ferry`) both call `reload(running)`.

Validation first:
    The file is loaded and validated exactly as at startup. Any `ConfigError` refuses
    the whole reload: every error is returned (and logged), nothing changes, the
    daemon keeps serving its last good config.

Sections that cannot change live:
    `[store]`, `[listener]`, `[control]`, `[supervisor]` and `[telemetry]` are fixed
    for the life of the process (an open database, bound sockets, a restart budget,
    installed exporters). If any of them differs, the reload is refused as a whole
    with `[listener] changed: restart ferry to apply` and nothing changes — applying
    the components alone would leave the file saying something the daemon does not do.
    One exception: `[listener] tls`. Its certificate and key are read again on every
    reload and serve new connections (open ones keep theirs), so certificates rotate
    without a restart; a certificate or key that cannot be used refuses the reload.

Secrets:
    Every secret reference is read again by the reload's `load`. A component whose secret
    value changed (a rotated file or credential) counts as changed; webhook verifiers are
    rebuilt on every reload, so a rotated signing secret applies to the next request.

What changes:
    Sources, transforms and sinks are compared as their frozen config structs. A
    transform also counts as changed when what reads its output changes (its sinks are
    fixed when it is built); a source's fan-out lives in the ingest batcher and the
    listener's routes, which are swapped whole. Unchanged actors keep running: the
    same object, no restart, nothing in flight interrupted.

Order (no event lost):
    1. Replacement actors are built (nothing runs yet).
    2. The listener's routes and the batcher's fan-out maps are swapped in one step
       between requests: from then on new events follow the new wiring. A removed
       source's path answers 404.
    3. Removed and changed transforms are cancelled (a transform commits a batch and
       its cursor in one transaction, so a cut-off batch is simply re-run); added and
       changed ones start from their cursor.
    4. Each changed sink finishes what it holds (`[supervisor] shutdown_grace`, then it
       is cancelled) before its replacement starts, so no delivery is in flight twice;
       added sinks start; removed sinks finish and stop. Their pending deliveries stay
       in the store (`ferry ctl status` lists them as `unconfigured`) and are sent if the
       sink is configured again.
    5. If `[alerts]`, `[channels]` or `[alerting]` changed, the alerter is restarted with the
       new rules (each rule's state is in the store, so a firing alert stays firing); the
       result lists `alerts` as changed.
    Every stage finds its work in the store, so rows written between two steps wait
    there for the actor that owns them.

Cancellation:
    A reload runs shielded from the caller's cancellation (a control client going away,
    a request timeout) so that it never stops half-applied; each of its waits is bounded.
    Reloads are serialised, and none starts once the daemon is stopping.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import msgspec
import trio
from msgspec import Struct

from daemon.component import Deps, Wiring
from daemon.config.kinds import PollSourceConfig, WebhookSourceConfig, webhook_path
from daemon.config.root import Config, LoadedConfig, downstream, load
from daemon.errors import ConfigError
from daemon.registry import (
    Aggregator,
    Alerter,
    Poller,
    Transformer,
    WebhookRoute,
    build_poller,
    build_sink,
    build_transform,
    build_verifier,
    flatten,
    server_context,
)
from daemon.supervisor import Actor
from daemon.telemetry import masking
from daemon.telemetry.logs import use_redactor

if TYPE_CHECKING:
    from daemon.running import Running

log = logging.getLogger("ferry.reload")

FROZEN_SECTIONS: Final = ("store", "cluster", "listener", "control", "supervisor", "telemetry")
START_TIMEOUT: Final = 10.0
"""How long a reload waits for its new actors to start before answering (they keep starting after)."""


class ReloadResult(Struct, frozen=True):
    """What a reload did: `applied`, or refused with `errors` (and then nothing changed)."""

    applied: bool
    errors: list[str]
    config_path: str | None
    config_sha256: str
    added: list[str]
    changed: list[str]
    removed: list[str]
    unchanged: int
    not_started: list[str]


class Diff(NamedTuple):
    added: list[str]
    changed: list[str]
    removed: list[str]
    unchanged: list[str]


@dataclass(frozen=True)
class Plan:
    """What differs between two configs, per kind of component."""

    sources: Diff
    transforms: Diff
    sinks: Diff

    def paths(self, field: str) -> list[str]:
        """`sources.NAME`, … of every component in `field` (added, changed, removed)."""
        return [
            f"{kind}.{name}"
            for kind in ("sources", "transforms", "sinks")
            for name in getattr(getattr(self, kind), field)
        ]

    @property
    def unchanged(self) -> int:
        return len(self.sources.unchanged) + len(self.transforms.unchanged) + len(self.sinks.unchanged)


def config_sha256(loaded: LoadedConfig) -> str:
    """The SHA-256 of the config file's text, as `ferry ctl status` shows it."""
    return hashlib.sha256(loaded.text.encode()).hexdigest()


def frozen_changes(old: Config, new: Config) -> list[str]:
    """One refusal per section that differs but cannot change while ferry runs."""
    return [
        f"[{section}] changed: restart ferry to apply"
        for section in FROZEN_SECTIONS
        if _fixed_part(old, section) != _fixed_part(new, section)
    ]


def _fixed_part(config: Config, section: str) -> Any:
    """A frozen section without what a reload does apply: `[listener] tls` (certificates rotate)."""
    value = getattr(config, section)
    return msgspec.structs.replace(value, tls=None) if section == "listener" else value


def plan(old: Config, new: Config) -> Plan:
    """Compare two configs component by component (pure)."""
    before, after = downstream(old), downstream(new)

    def rewired(name: str) -> bool:
        return before.get(name) != after.get(name)

    return Plan(
        sources=_diff(old.sources, new.sources, rewired),
        transforms=_diff(old.transforms, new.transforms, rewired),
        sinks=_diff(old.sinks, new.sinks, lambda name: False),
    )


def _diff(old: Mapping[str, Any], new: Mapping[str, Any], rewired: Callable[[str], bool]) -> Diff:
    both = sorted(old.keys() & new.keys())
    changed = [name for name in both if old[name] != new[name] or rewired(name)]
    return Diff(
        added=sorted(new.keys() - old.keys()),
        changed=changed,
        removed=sorted(old.keys() - new.keys()),
        unchanged=[name for name in both if name not in changed],
    )


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
    return Alerter(
        config, running.store, lambda: flatten(telemetry.collect()), service=config.telemetry.service_name
    )


async def _realert(running: Running, old: Config, new: Config) -> bool:
    """Restart the alerter if its rules or channels changed (its state is in the store); whether it did."""
    if (old.alerts, old.channels, old.alerting) == (new.alerts, new.channels, new.alerting):
        return False
    if "alerter" in running.supervisor.actors:
        await running.supervisor.stop("alerter")
    running.alerter = None
    if new.alerts and running.intake_nursery is not None:
        alerter = running.alerter = build_alerter(new, running)
        running.supervisor.start(running.intake_nursery, "alerter", lambda: alerter)
    return True


def transformer(config: Config, name: str, running: Running) -> Transformer | Aggregator:
    """The actor of one transform: an `Aggregator` when it has `aggregate`, else a `Transformer`."""
    wiring = Wiring(*downstream(config)[name])
    return build_transform(name, config.transforms[name], deps(config, running), wiring)


async def reload(running: Running) -> ReloadResult:
    """Re-read the config file and apply it; see the module docstring. Never raises for a bad file."""
    with trio.CancelScope(shield=True):
        async with running.reload_lock:
            running.notifier.reloading()
            result = await _reload(running)
            if result.applied:
                running.notifier.reloaded(
                    f"reloaded: {len(result.added)} added, {len(result.changed)} changed, "
                    f"{len(result.removed)} removed"
                )
            else:
                running.notifier.reloaded(
                    f"reload refused ({len(result.errors)} error(s)); running the previous config"
                )
    fields: dict[str, Any] = {"config": result.config_path, "sha256": result.config_sha256[:12]}
    if result.applied:
        fields |= {"added": result.added, "changed": result.changed, "removed": result.removed}
        if result.not_started:
            fields["not_started"] = result.not_started
        log.info("config reloaded", extra={"fields": fields})
    else:
        log.error("reload refused, nothing changed", extra={"fields": fields | {"errors": result.errors}})
    return result


def _same(actor: Actor) -> Callable[[], Actor]:
    """A supervisor factory that restarts the same object (it rebuilds its state from the store)."""
    return lambda: actor


def _refused(running: Running, errors: list[str]) -> ReloadResult:
    path = running.loaded.path
    return ReloadResult(
        False, errors, str(path) if path else None, config_sha256(running.loaded), [], [], [], 0, []
    )


async def _reload(running: Running) -> ReloadResult:
    if running.stop.is_set():
        return _refused(running, ["ferry is stopping"])
    if running.sinks_nursery is None or running.intake_nursery is None:
        return _refused(running, ["ferry is still starting"])
    if running.batcher is None or running.listener is None:
        return _refused(running, ["ferry is still starting"])
    path = running.loaded.path
    if path is None:
        return _refused(running, ["ferry was started without a config file; there is nothing to re-read"])
    try:
        loaded = load(path)
    except ConfigError as exc:
        return _refused(running, exc.problems)
    old, new = running.config, loaded.config
    refusals = frozen_changes(old, new)
    if refusals:
        return _refused(running, refusals)
    changes = plan(old, new)
    supervisor = running.supervisor
    grace = new.supervisor.shutdown_grace

    # 1. Replacement actors and routes (verifiers with the secrets just read), built before
    #    anything changes; budgets are reconfigured in place.
    try:
        new_routes = routes(new)
        tls = server_context(new.listener.tls)  # the certificate and key files, read again
    except ConfigError as exc:  # a key file changed since `load` read it
        return _refused(running, exc.problems)
    running.rate_limits.update(new.rate_limits)
    sinks = {
        name: build_sink(name, new.sinks[name], deps(new, running))
        for name in [*changes.sinks.added, *changes.sinks.changed]
    }
    transforms = {
        name: transformer(new, name, running)
        for name in [*changes.transforms.added, *changes.transforms.changed]
    }
    polls = {
        name: poller(new, name, running)
        for name in pollers(new, [*changes.sources.added, *changes.sources.changed])
    }
    for name, source in polls.items():
        held = running.actors.pollers.get(name)
        if held is not None and held.paused:
            source.pause()  # an operator's hold outlives a reload, as a sink's does
    for name, sink in sinks.items():
        previous = running.actors.sinks.get(name)
        if previous is not None and previous.paused:
            sink.pause()  # an operator's hold outlives a reload (not a restart)

    # 2. The switch: routes and fan-out in one step, with the state `ferry ctl` reads.
    sink_map, consumers = fan_out(new)
    running.batcher.rewire(sinks=sink_map, consumers=consumers)
    running.listener.reroute(new_routes)
    running.listener.retls(tls)
    redactor = masking.config_redactor(new, keep=running.redaction.redactor)  # secrets just read too
    running.redaction.redactor = redactor
    use_redactor(redactor)
    running.pauses.sources.intersection_update(new.sources)
    for name in [*changes.sinks.removed, *changes.transforms.removed, *changes.sources.removed]:
        running.actors.remove(name)
    for name in pollers(old, changes.sources.changed):
        running.actors.remove(name)  # a poll source that became a webhook one
    running.actors.sinks.update(sinks)
    running.actors.transforms.update(transforms)
    running.actors.pollers.update(polls)
    running.config, running.loaded = new, loaded

    # 3. Transforms.
    for name in [*changes.transforms.removed, *changes.transforms.changed]:
        await supervisor.stop(f"transform.{name}")
    for name, actor in transforms.items():
        supervisor.start(running.intake_nursery, f"transform.{name}", _same(actor))

    # 3b. Pollers: the old one ends (a commit in flight still lands) before the new one reads
    # its state back from the store.
    for name in pollers(old, [*changes.sources.removed, *changes.sources.changed]):
        await supervisor.stop(f"poll.{name}")
    for name, source in polls.items():
        supervisor.start(running.intake_nursery, f"poll.{name}", _same(source))

    # 4. Sinks: each changed one finishes before its replacement starts; all of them at once.
    async def replace(name: str) -> None:
        await supervisor.stop(f"sink.{name}", grace=grace)
        assert running.sinks_nursery is not None
        supervisor.start(running.sinks_nursery, f"sink.{name}", _same(sinks[name]))

    async with trio.open_nursery() as nursery:
        for name in changes.sinks.changed:
            nursery.start_soon(replace, name)
        for name in changes.sinks.removed:
            nursery.start_soon(partial(supervisor.stop, f"sink.{name}", grace=grace))
        for name in changes.sinks.added:
            supervisor.start(running.sinks_nursery, f"sink.{name}", _same(sinks[name]))

    alerts_changed = await _realert(running, old, new)
    not_started = []
    deadline = trio.current_time() + START_TIMEOUT
    started = [
        *(f"transform.{n}" for n in transforms),
        *(f"poll.{n}" for n in polls),
        *(f"sink.{n}" for n in sinks),
    ]
    if alerts_changed and running.alerter is not None:
        started.append("alerter")
    for actor_name in started:
        if not await supervisor.started(actor_name, max(0.0, deadline - trio.current_time())):
            not_started.append(actor_name)
    return ReloadResult(
        applied=True,
        errors=[],
        config_path=str(path),
        config_sha256=config_sha256(loaded),
        added=changes.paths("added"),
        changed=[*changes.paths("changed"), *(["alerts"] if alerts_changed else [])],
        removed=changes.paths("removed"),
        unchanged=changes.unchanged,
        not_started=not_started,
    )
