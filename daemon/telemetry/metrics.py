"""The daemon's metric instruments (OTel meter), shared by every actor.

`current()` returns the daemon's `Metrics` (see there: no process-wide instruments); until
telemetry binds it to a meter (and after it stops) its instruments do nothing, so actors record
unconditionally. Attribute dicts are small and built once per actor where the values are fixed
(source, sink).

Names (all prefixed `ferry.`):

| instrument | kind | attributes |
|---|---|---|
| `events.received` | counter | `source` |
| `events.rejected` | counter | `source`, `reason` |
| `listener.protocol_errors` | counter (requests that broke HTTP/1.1, and failed connections) | `kind` |
| `deliveries` | counter (deliveries finished or rescheduled) | `sink`, `outcome` = delivered / retry / dead |
| `delivery.attempts` | counter (requests sent) | `sink` |
| `delivery.duration` | histogram, s, one per attempt | `sink`, `outcome` |
| `delivery.latency` | histogram, s, created -> delivered (<= 16 samples per batch request) | `sink` |
| `dead_letters` | counter | `stage` (a sink or a transform) |
| `queue.depth` | gauge, pending deliveries | `stage` |
| `actor.restarts` | counter | `actor` |
| `telemetry.spans_dropped` | counter | - |
| `enrich.lookups` | counter | `transform`, `result` = request / hit / shared / error |
| `process.cpu.time` | counter, s | `mode` = user / system |
| `process.memory.rss` | gauge, bytes | - |
| `process.open_fds` | gauge | - |
| `ratelimit.waits` | counter (permits that had to queue) | `limit`, `user` |
| `ratelimit.wait_time` | histogram, s, per queued permit | `limit`, `user` |
| `ratelimit.pauses` | counter (answers that paused a budget) | `limit` |
| `breaker.state` | gauge, 0 closed / 1 half-open / 2 open | `sink`, `url` |
| `sink.concurrency` | gauge, current adaptive concurrency limit | `sink` |
| `poll.requests` | counter (requests a poller sent) | `source`, `outcome` = ok / not_modified / error |
| `poll.items` | counter (items read) | `source`, `outcome` = new / duplicate |
| `poll.errors` | counter (failed poll cycles) | `source`, `error` (http_503, timeout, not_json, …) |
| `poll.failures` | gauge, consecutive failed cycles (0: healthy) | `source` |

Histograms use `LATENCY_BUCKETS` (seconds, 1 ms to 5 min), so Prometheus and the alert rules'
quantiles (`p99(...)`) resolve milliseconds; the SDK's default buckets are meant for ms values.

`catalogue()` names every instrument `Metrics` creates (alert rules are checked against it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeter, Observation

from daemon.telemetry import procstat

__all__ = ["LATENCY_BUCKETS", "Metrics", "catalogue", "current", "install"]

LATENCY_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)


class Metrics:
    """Every instrument one daemon records, built on one meter (a no-op one until `bind`).

    One per daemon (`Running.metrics`): telemetry binds it to its meter when a reader wants
    metrics and back to a no-op meter when it stops; the gauges' values and the counts held here
    survive a rebind, and the object stays the same, so whoever holds it keeps recording.
    """

    def __init__(self, meter: Meter | None = None, spans_dropped: Callable[[], int] = lambda: 0) -> None:
        self.queue_depths: dict[str, int] = {}
        # Set by the sinks' guards on every change (daemon/config/limits.py, actors/sink/guard.py).
        self.breaker_states: dict[tuple[str, str], int] = {}
        self.concurrency_limits: dict[str, int] = {}
        self.poll_failures: dict[str, int] = {}  # set by each poller after every cycle
        # Per-event counts are plain integers read at export time: an OTel `Counter.add`
        # costs ~4 us, a tenth of what storing the event costs (measured with make bench).
        self.received: Counter[str] = Counter()
        self.bind(NoOpMeter("ferry") if meter is None else meter, spans_dropped)

    def bind(self, meter: Meter, spans_dropped: Callable[[], int] = lambda: 0) -> None:
        """(Re)create every instrument on `meter`: what is recorded from now on goes to it."""
        self._spans_dropped = spans_dropped
        self.live = not isinstance(meter, NoOpMeter)
        """Whether the instruments record (some reader reads them)."""
        meter.create_observable_counter(
            "ferry.events.received",
            callbacks=[self._observe_received],
            unit="{event}",
            description="Events accepted and committed, by source.",
        )
        self.events_rejected = meter.create_counter(
            "ferry.events.rejected",
            unit="{request}",
            description="Webhook requests answered with an error, by source and reason.",
        )
        self.protocol_errors = meter.create_counter(
            "ferry.listener.protocol_errors",
            unit="{request}",
            description="Webhook listener requests that broke HTTP/1.1 (malformed, ambiguous framing, "
            "oversized head) and connections that failed, by kind.",
        )
        self.deliveries = meter.create_counter(
            "ferry.deliveries",
            unit="{delivery}",
            description="Delivery attempts' outcomes: delivered, retry (rescheduled) or dead.",
        )
        self.attempts = meter.create_counter(
            "ferry.delivery.attempts", unit="{request}", description="Requests (attempts) a sink sent."
        )
        self.delivery_duration = meter.create_histogram(
            "ferry.delivery.duration",
            unit="s",
            description="Time one sink attempt took.",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self.delivery_latency = meter.create_histogram(
            "ferry.delivery.latency",
            unit="s",
            description="From a delivery's creation to its success.",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self.dead_letters = meter.create_counter(
            "ferry.dead_letters", unit="{delivery}", description="Deliveries dead-lettered, by stage."
        )
        self.lookups = meter.create_counter(
            "ferry.enrich.lookups",
            unit="{lookup}",
            description="Enrichment lookups: requests sent, cache hits, shared with one in flight, given up.",
        )
        self.restarts = meter.create_counter(
            "ferry.actor.restarts", unit="{restart}", description="Actor crashes followed by a restart."
        )
        meter.create_observable_gauge(
            "ferry.queue.depth",
            callbacks=[self._observe_depths],
            unit="{delivery}",
            description="Pending deliveries per stage (sampled every metrics interval).",
        )
        self.ratelimit_waits = meter.create_counter(
            "ferry.ratelimit.waits", unit="{permit}", description="Rate-limit permits that had to queue."
        )
        self.ratelimit_wait_time = meter.create_histogram(
            "ferry.ratelimit.wait_time",
            unit="s",
            description="Time a queued rate-limit permit waited.",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self.ratelimit_pauses = meter.create_counter(
            "ferry.ratelimit.pauses",
            unit="{pause}",
            description="Answers (Retry-After, RateLimit-*) that paused a whole rate-limit budget.",
        )
        meter.create_observable_gauge(
            "ferry.breaker.state",
            callbacks=[self._observe_breakers],
            description="Circuit breaker per sink URL: 0 closed, 1 half-open, 2 open.",
        )
        meter.create_observable_gauge(
            "ferry.sink.concurrency",
            callbacks=[self._observe_concurrency],
            unit="{request}",
            description="Current limit of requests in flight of an adaptive sink.",
        )
        self.poll_requests = meter.create_counter(
            "ferry.poll.requests", unit="{request}", description="Requests pollers sent, by outcome."
        )
        self.poll_items = meter.create_counter(
            "ferry.poll.items", unit="{item}", description="Items pollers read: new (stored) or duplicate."
        )
        self.poll_errors = meter.create_counter(
            "ferry.poll.errors", unit="{cycle}", description="Failed poll cycles, by source and error kind."
        )
        meter.create_observable_gauge(
            "ferry.poll.failures",
            callbacks=[self._observe_poll_failures],
            unit="{cycle}",
            description="Consecutive failed cycles of each poll source (0: healthy).",
        )
        meter.create_observable_counter(
            "ferry.telemetry.spans_dropped",
            callbacks=[self._observe_dropped],
            unit="{span}",
            description="Spans lost: export queue full or export failed.",
        )
        meter.create_observable_counter(
            "ferry.process.cpu.time",
            callbacks=[_observe_cpu],
            unit="s",
            description="CPU time the daemon process has used, by mode (user, system).",
        )
        meter.create_observable_gauge(
            "ferry.process.memory.rss",
            callbacks=[_observe_rss],
            unit="By",
            description="Resident memory of the daemon process.",
        )
        meter.create_observable_gauge(
            "ferry.process.open_fds",
            callbacks=[_observe_fds],
            unit="{fd}",
            description="File descriptors the daemon process has open.",
        )

    def _observe_received(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, {"source": source}) for source, count in list(self.received.items())]

    def _observe_depths(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(depth, {"stage": stage}) for stage, depth in list(self.queue_depths.items())]

    def _observe_breakers(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(state, {"sink": sink, "url": url})
            for (sink, url), state in list(self.breaker_states.items())
        ]

    def _observe_concurrency(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(limit, {"sink": sink}) for sink, limit in list(self.concurrency_limits.items())]

    def _observe_poll_failures(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, {"source": source}) for source, count in list(self.poll_failures.items())]

    def _observe_dropped(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._spans_dropped())]


def _observe_cpu(options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(seconds, {"mode": mode}) for mode, seconds in procstat.cpu_seconds().items()]


def _observe_rss(options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(procstat.rss_bytes())]


def _observe_fds(options: CallbackOptions) -> Iterable[Observation]:
    count = procstat.open_fds()
    return [] if count is None else [Observation(count)]


class _Catalogue(NoOpMeter):
    """A meter that only writes down the name and kind of each instrument created on it."""

    def __init__(self) -> None:
        super().__init__("ferry")
        self.names: dict[str, str] = {}

    def __getattribute__(self, attr: str) -> Any:
        value = super().__getattribute__(attr)
        if attr.startswith("create_"):
            names = super().__getattribute__("names")

            def create(name: str, *args: Any, **kwargs: Any) -> Any:
                names[name] = attr.removeprefix("create_")
                return value(name, *args, **kwargs)

            return create
        return value


def catalogue() -> dict[str, str]:
    """Every instrument `Metrics` creates: name -> kind (`counter`, `histogram`, `observable_gauge`, ...)."""
    meter = _Catalogue()
    Metrics(meter)
    return dict(meter.names)


_installed: ContextVar[Metrics] = ContextVar("ferry.metrics")


def current() -> Metrics:
    """The instruments of the daemon this task belongs to.

    `serve` installs its daemon's `Metrics` (`Running.metrics`) in its own context, which every
    task it starts inherits, so two daemons in one process (tests) never share instruments and
    nothing is left for a test to reset: a context with none installed (an actor built outside a
    daemon) gets fresh unbound instruments of its own on first use.
    """
    try:
        return _installed.get()
    except LookupError:
        return install(Metrics())


def install(metrics: Metrics) -> Metrics:
    """Make `metrics` what `current()` answers in this context and the tasks it starts from now on."""
    _installed.set(metrics)
    return metrics
