"""The config half of the registry: each component kind's config struct, tagged by `type`, and its checks.

Every kind defines its struct and its checks in its own package (`actors/KIND/config.py`); this
module is the one place in `daemon.config` that imports them, so the root `Config` is assembled
from here (`SourceConfig`, `SinkConfig`, `TransformConfig`, the alerting tables). The other half,
`daemon.registry`, maps the same structs to the actors' constructors. A new source or sink kind is
one struct in its package plus one line in each union here and in the registry.

Imports stay cheap: nothing here imports an actor's runtime module (the key checks that need
`actors.webhook.verify` and `actors.webhook.tls` import them when called).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from actors.alerting.config import AlertingConfig, AlertRuleConfig, ChannelConfig, check_alerts
from actors.poll.config import PollSourceConfig, poll_errors
from actors.sink.config import FileSinkConfig, HttpSinkConfig, SinkConfig, sink_errors
from actors.transform.config import TransformConfig, check_transform
from actors.webhook.config import (
    ListenerConfig,
    ListenerTlsConfig,
    WebhookSourceConfig,
    resolve_jwks,
    verify_errors,
    webhook_path,
)
from daemon.errors import ConfigError

__all__ = [
    "SINK_KINDS",
    "SOURCE_KINDS",
    "AlertRuleConfig",
    "AlertingConfig",
    "ChannelConfig",
    "FileSinkConfig",
    "HttpSinkConfig",
    "ListenerConfig",
    "PollSourceConfig",
    "SinkConfig",
    "SourceConfig",
    "TransformConfig",
    "WebhookSourceConfig",
    "check_alerts",
    "check_transform",
    "key_errors",
    "poll_errors",
    "resolve_jwks",
    "sink_errors",
    "verify_errors",
    "webhook_path",
]

SourceConfig = WebhookSourceConfig | PollSourceConfig
"""Every source kind, tagged by `type`."""

SOURCE_KINDS: Mapping[str, type[SourceConfig]] = {"webhook": WebhookSourceConfig, "poll": PollSourceConfig}
"""`[sources.NAME] type = …` → its struct (the same kinds as `SourceConfig`; a test checks it)."""

SINK_KINDS: Mapping[str, type[SinkConfig]] = {"http": HttpSinkConfig, "file": FileSinkConfig}
"""`[sinks.NAME] type = …` → its struct (the same kinds as `SinkConfig`; a test checks it)."""


def key_errors(tls: ListenerTlsConfig | None, sources: Mapping[str, SourceConfig]) -> Iterator[str]:
    """Keys that read fine but cannot be used (a PEM that is not a key, a JWKS file that is not one)."""
    from actors.webhook.tls import server_context
    from actors.webhook.verify import build

    try:
        server_context(tls)
    except ConfigError as exc:
        yield from exc.problems

    for name, source in sources.items():
        if isinstance(source, WebhookSourceConfig) and source.verify is not None:
            try:
                build(source.verify, f"$.sources.{name}.verify")
            except ConfigError as exc:
                yield from exc.problems
