"""The sink kinds' registrations: `type = "http"` and `type = "file"` (config in `actors.sink.config`)."""

from __future__ import annotations

from typing import Final

from actors.sink.config import BatchConfig, FileSinkConfig, HttpSinkConfig
from actors.sink.file import FileSender
from actors.sink.guard import SinkGuard
from actors.sink.http import HttpSender
from actors.sink.sink import Sink
from daemon.component import Deps, Kind, Wiring
from daemon.config.units import Duration
from daemon.store.ordering import Ordering

FILE_SINK_BATCH: Final = BatchConfig(max_items=512, max_wait=Duration(0))
"""A file sink appends (and fsyncs) up to this many deliveries at once."""


def http_sink(name: str, config: HttpSinkConfig, deps: Deps, _: Wiring) -> Sink:
    """An HTTP sink: its guard (concurrency, breakers, rate limit) shared by every sender it makes."""
    guard = SinkGuard(
        name,
        config.targets,
        concurrency=config.max_concurrency,
        adaptive=config.adaptive if config.concurrency == "adaptive" else None,
        breaker=config.breaker_policy,
        limiter=deps.rate_limits.limiter(config.rate_limit),
    )
    return Sink(
        name,
        deps.store,
        lambda: HttpSender(name, config, guard=guard, store=deps.store),
        retry=config.retry,
        concurrency=config.max_concurrency,
        batch=config.batch,
        ordering=Ordering(config.ordering) if config.ordering is not None else None,
        guard=guard,
        quarantine_after=deps.quarantine_after,
        clock=deps.clock,
        taps=deps.taps,
        redaction=deps.redaction,
        send_timeout=config.timeout,
    )


def file_sink(name: str, config: FileSinkConfig, deps: Deps, _: Wiring) -> Sink:
    """A file sink: one writer, batches of `FILE_SINK_BATCH`."""
    return Sink(
        name,
        deps.store,
        lambda: FileSender(name, config),
        retry=config.retry,
        concurrency=1,
        batch=FILE_SINK_BATCH,
        quarantine_after=deps.quarantine_after,
        clock=deps.clock,
        taps=deps.taps,
        redaction=deps.redaction,
    )


HTTP_SINK: Final = Kind("http", HttpSinkConfig, http_sink)
FILE_SINK: Final = Kind("file", FileSinkConfig, file_sink)
