"""The one place where the runtime meets concrete actors: config `type` → actor class."""

from __future__ import annotations

from collections.abc import Callable

from actors.aggregator import Aggregator
from actors.alerter import Alerter
from actors.enricher import Enricher
from actors.file_sink import FileSender
from actors.guard import SinkGuard
from actors.http_sink import HttpSender
from actors.poller import Poller
from actors.sink import Sender, Sink
from actors.transformer import Transformer
from actors.webhook import WebhookListener, WebhookRoute

from .config import BatchConfig, FileSinkConfig, HttpSinkConfig, SinkConfig
from .ordering import Ordering
from .ratelimit import RateLimits
from .store import Store
from .units import Duration

__all__ = [
    "Aggregator",
    "Alerter",
    "Enricher",
    "Poller",
    "Transformer",
    "WebhookListener",
    "WebhookRoute",
    "build_sink",
]

FILE_SINK_BATCH = BatchConfig(max_items=512, max_wait=Duration(0))


def build_sink(
    name: str,
    config: SinkConfig,
    store: Store,
    rate_limits: RateLimits | None = None,
    *,
    quarantine_after: int = 3,
) -> Sink:
    """The delivery actor for one configured sink; `rate_limits` holds the budgets it may name,
    `quarantine_after` is `[supervisor] quarantine_after`."""
    factory: Callable[[], Sender]
    if isinstance(config, HttpSinkConfig):
        guard = SinkGuard(
            name,
            config.targets,
            concurrency=config.max_concurrency,
            adaptive=config.adaptive if config.concurrency == "adaptive" else None,
            breaker=config.breaker_policy,
            limiter=(rate_limits or RateLimits()).limiter(config.rate_limit),
        )
        factory = lambda: HttpSender(name, config, guard=guard, store=store)  # noqa: E731
        ordering = Ordering(config.ordering) if config.ordering is not None else None
        return Sink(
            name,
            store,
            factory,
            retry=config.retry,
            concurrency=config.max_concurrency,
            batch=config.batch,
            ordering=ordering,
            guard=guard,
            quarantine_after=quarantine_after,
        )
    if isinstance(config, FileSinkConfig):
        factory = lambda: FileSender(name, config)  # noqa: E731
        return Sink(
            name,
            store,
            factory,
            retry=config.retry,
            concurrency=1,
            batch=FILE_SINK_BATCH,
            quarantine_after=quarantine_after,
        )
    raise TypeError(f"no sink for {type(config).__name__}")
