"""The one place where the runtime meets concrete actors: config `type` → the kind's registration.

Each component kind registers where it is defined (`actors/KIND/kind.py`: its `type` name, config
struct and constructor, a `daemon.component.Kind`); this module maps the names to them and hands the
runtime (app, reload, Running, the control commands) the actor classes it holds and reports on. The
config half of the same map is `daemon.config.kinds` (the structs the root config is assembled from);
a test checks that both list the same kinds. Nothing else in `daemon/` imports `actors/` (the import
contract in pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from msgspec import Struct

from actors.alerting.alerter import Alerter
from actors.alerting.cluster import cluster_view, publish_forever
from actors.alerting.expr import Snapshot, flatten
from actors.alerting.rules import AlertView
from actors.poll.config import PollSourceConfig
from actors.poll.kind import POLL_SOURCE
from actors.poll.pages import PollStatus
from actors.poll.poller import Poller
from actors.sink.config import FileSinkConfig, HttpSinkConfig, SinkConfig
from actors.sink.kind import FILE_SINK, HTTP_SINK
from actors.sink.sink import Sink
from actors.transform.aggregator import Aggregator
from actors.transform.config import TransformConfig
from actors.transform.kind import TRANSFORM
from actors.transform.transformer import Transformer
from actors.webhook.ingest import IngestBatcher
from actors.webhook.listener import WebhookListener, WebhookRoute
from actors.webhook.tls import server_context
from actors.webhook.verify import build as build_verifier
from daemon.component import Deps, Kind, Wiring

__all__ = [
    "SINK_KINDS",
    "SOURCE_KINDS",
    "Aggregator",
    "AlertView",
    "Alerter",
    "IngestBatcher",
    "PollStatus",
    "Poller",
    "Sink",
    "Snapshot",
    "Transformer",
    "WebhookListener",
    "WebhookRoute",
    "build_poller",
    "build_sink",
    "build_transform",
    "build_verifier",
    "cluster_view",
    "flatten",
    "publish_forever",
    "server_context",
]

SinkKind = Kind[HttpSinkConfig, Sink] | Kind[FileSinkConfig, Sink]

SINK_KINDS: Final[Mapping[str, SinkKind]] = {kind.tag: kind for kind in (HTTP_SINK, FILE_SINK)}
"""`[sinks.NAME] type = …` → its registration."""

SOURCE_KINDS: Final[Mapping[str, Kind[PollSourceConfig, Poller]]] = {POLL_SOURCE.tag: POLL_SOURCE}
"""`[sources.NAME] type = …` → its registration, for the kinds that run an actor of their own
(a webhook source is a route of the one listener, built by `daemon.assembly.routes`)."""


def _tag(config: Struct) -> str:
    """The `type` name a tagged config struct was decoded from."""
    return str(config.__struct_config__.tag)


def build_sink(name: str, config: SinkConfig, deps: Deps) -> Sink:
    """The delivery actor for one configured sink, by its `type`."""
    return SINK_KINDS[_tag(config)].create(name, config, deps)


def build_poller(name: str, config: PollSourceConfig, deps: Deps, wiring: Wiring) -> Poller:
    """The actor of one poll source, sending to `wiring`."""
    return SOURCE_KINDS[_tag(config)].create(name, config, deps, wiring)


def build_transform(
    name: str, config: TransformConfig, deps: Deps, wiring: Wiring
) -> Transformer | Aggregator:
    """The actor of one transform, sending to `wiring`."""
    return TRANSFORM.create(name, config, deps, wiring)
