"""A sink's config: `[sinks.NAME]` with `type = "http"` or `type = "file"`, and the tables they share.

`sink_errors` is the part of `ferry check` that needs more than types (one of `url`/`urls`,
backoff bounds, ordering, outbound auth, item outcomes).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from msgspec import Meta

from actors.sink.items_config import ItemOutcomesConfig, check_item_outcomes
from daemon.config.auth import AuthConfig, TlsConfig, auth_errors
from daemon.config.base import ComponentName, Section, default
from daemon.config.limits import AdaptiveConfig, BreakerConfig
from daemon.config.sync import OrderingConfig, check_ordering
from daemon.config.units import Duration, Size


class RetryConfig(Section, frozen=True):
    """When a failed delivery is tried again, and when it is dead-lettered instead."""

    max_attempts: Annotated[int, Meta(ge=1, description="Attempts before the delivery is dead-lettered.")] = 8
    initial_backoff: Annotated[Duration, Meta(description="Backoff ceiling after the first failure.")] = (
        default(Duration(0.5))
    )
    max_backoff: Annotated[Duration, Meta(description="Largest backoff ceiling (full jitter below it).")] = (
        default(Duration(300))
    )
    max_age: Annotated[
        Duration, Meta(description="A delivery older than this is dead-lettered on its next failure.")
    ] = default(Duration(86400))


class BatchConfig(Section, frozen=True):
    """Send many deliveries in one request, as a JSON array."""

    max_items: Annotated[int, Meta(ge=1, le=100_000, description="Most deliveries in one request.")] = 100
    max_bytes: Annotated[Size, Meta(description="Largest request body.")] = default(Size(1024**2))
    max_wait: Annotated[
        Duration, Meta(description="How long a partial batch waits for more deliveries before it is sent.")
    ] = default(Duration(0.05))
    envelope: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        Meta(
            description='Send `{"ENVELOPE": [...]}` instead of a bare array (e.g. `"inputs"` for '
            "HubSpot's batch APIs).",
        ),
    ] = None
    item_outcomes: Annotated[
        ItemOutcomesConfig | None,
        Meta(
            description="Read which items the receiver refused from its 2xx answer (HubSpot's 207, a "
            "bulk answer): `{ preset = \"hubspot\" }` or `{ failed = '<jq>' }` (table below). Unset: "
            "a 2xx delivers the whole batch."
        ),
    ] = None


class HttpSinkConfig(Section, frozen=True, tag="http", tag_field="type"):
    """Delivers each event as a JSON request to an HTTP API, with retries and a dead-letter queue."""

    inputs: Annotated[
        list[ComponentName], Meta(min_length=1, description="Sources or transforms to deliver.")
    ]
    url: Annotated[
        Annotated[str, Meta(pattern=r"^https?://")] | None,
        Meta(description="Target URL (http or https); give this or `urls`."),
    ] = None
    urls: Annotated[
        list[Annotated[str, Meta(pattern=r"^https?://")]],
        Meta(
            max_length=16,
            description="Failover: target URLs in order of preference, each with its own circuit "
            "breaker; deliveries go to the first whose breaker is not open (docs/limits.md).",
        ),
    ] = []
    method: Annotated[Literal["POST", "PUT", "PATCH"], Meta(description="HTTP method.")] = "POST"
    headers: Annotated[dict[str, str], Meta(description="Extra request headers.")] = {}
    timeout: Annotated[Duration, Meta(description="Whole-request timeout (connect, send, receive).")] = (
        default(Duration(10))
    )
    concurrency: Annotated[
        Annotated[int, Meta(ge=1, le=1024)] | Literal["adaptive"],
        Meta(description='Requests in flight at once, or `"adaptive"` (AIMD within `adaptive`).'),
    ] = 8
    adaptive: Annotated[
        AdaptiveConfig, Meta(description='Bounds of `concurrency = "adaptive"` (table below).')
    ] = default(AdaptiveConfig())
    breaker: Annotated[
        BreakerConfig | None,
        Meta(
            description="Circuit breaker per URL (table below); unset: none, unless `urls` lists two or more."
        ),
    ] = None
    rate_limit: Annotated[
        str | None, Meta(description="Name of a `[rate_limits.NAME]` budget every request takes a permit of.")
    ] = None
    idempotency_header: Annotated[
        str, Meta(min_length=1, description="Header carrying the delivery id (stable across retries).")
    ] = "Idempotency-Key"
    client: Annotated[
        Literal["lean", "httpx"],
        Meta(
            description="`lean`: ferry's own HTTP/1.1 client for plain JSON requests (fastest). "
            "`httpx`: full-featured "
            "client (proxies from the environment)."
        ),
    ] = "lean"
    retry: RetryConfig = default(RetryConfig())
    batch: Annotated[
        BatchConfig | None, Meta(description="Send JSON arrays; omit for one request per event.")
    ] = None
    ordering: Annotated[
        OrderingConfig | None,
        Meta(
            description='Per-key ordering and conflict resolution: `{ key = ".email", version = '
            '".updated_at", compare = "rfc3339" }`; older versions are dropped as stale '
            "(docs/enrichment-and-ordering.md)."
        ),
    ] = None
    auth: Annotated[
        AuthConfig | None, Meta(description="Authentication of each request (docs/security.md).")
    ] = None
    tls: Annotated[
        TlsConfig | None, Meta(description="Custom CA bundle and/or client certificate (mTLS) for https.")
    ] = None

    @property
    def targets(self) -> list[str]:
        """The URLs to send to, in order of preference (`url` alone, or `urls`)."""
        return [self.url] if self.url is not None else list(self.urls)

    @property
    def max_concurrency(self) -> int:
        """Most requests ever in flight: `concurrency`, or the adaptive ceiling."""
        return self.adaptive.ceiling if self.concurrency == "adaptive" else self.concurrency

    @property
    def breaker_policy(self) -> BreakerConfig | None:
        """The breaker in force: as configured, or the defaults when failing over between URLs."""
        return self.breaker if self.breaker is not None or len(self.targets) < 2 else BreakerConfig()


class FileSinkConfig(Section, frozen=True, tag="file", tag_field="type"):
    """Appends each event as one JSON line to a file, fsynced before it counts as delivered."""

    inputs: Annotated[
        list[ComponentName], Meta(min_length=1, description="Sources or transforms to deliver.")
    ]
    path: Annotated[
        str, Meta(description="File to append to; relative paths resolve from the config's folder.")
    ]
    retry: RetryConfig = default(RetryConfig())


SinkConfig = HttpSinkConfig | FileSinkConfig
"""Every sink kind, tagged by `type`."""


def sink_errors(name: str, sink: SinkConfig) -> Iterator[str]:
    """What is wrong with one sink beyond its types, each prefixed with its TOML path."""
    if sink.retry.initial_backoff > sink.retry.max_backoff:
        yield f"$.sinks.{name}.retry.initial_backoff: larger than max_backoff"
    if isinstance(sink, HttpSinkConfig) and sink.ordering is not None:
        yield from check_ordering(f"$.sinks.{name}", sink.ordering)
    if isinstance(sink, HttpSinkConfig):
        if (sink.url is None) == (not sink.urls):
            yield f"$.sinks.{name}.url: give either `url` or `urls` (a list), not both or neither"
        elif len(set(sink.urls)) != len(sink.urls):
            yield f"$.sinks.{name}.urls: lists the same URL twice"
        yield from auth_errors(sink.auth, sink.tls, f"$.sinks.{name}")
        if sink.batch is not None and sink.batch.item_outcomes is not None:
            path = f"$.sinks.{name}.batch.item_outcomes"
            yield from check_item_outcomes(path, sink.batch.item_outcomes)
