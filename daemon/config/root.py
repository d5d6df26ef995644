"""The whole configuration as frozen msgspec Structs: decode once, validate, never mutate.

Every struct rejects unknown fields. Each field's description is the config
reference (`docs/configuration.md` is generated from these types by
`ferry config-docs`, and a test fails when it is stale).

Error handling: `load()` and `parse()` collect *every* error they find, each
prefixed with its TOML path (`$.sinks.crm.retry.max_attempts: Expected int,
got str`), and raise one `ConfigError` holding them all. Nothing is started
from a file with any error.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import jq
import msgspec
from msgspec import Meta

from actors.alerting.config import AlertingConfig, AlertRuleConfig, ChannelConfig, check_alerts
from actors.poll.config import PollSourceConfig, poll_errors
from actors.sink.items_config import ItemOutcomesConfig, check_item_outcomes
from actors.transform.config import SCHEMA, AggregateConfig, RouteConfig, SchemaSpec, check_transform
from actors.webhook.config import ListenerTlsConfig, VerifyConfig, resolve_jwks, verify_errors
from daemon.config import secrets
from daemon.config.auth import AuthConfig, EncryptionConfig, TlsConfig, auth_errors, resolve_tls
from daemon.config.base import NAME_RE, ComponentName, Section, default
from daemon.config.limits import AdaptiveConfig, BreakerConfig, RateLimitConfig, limit_errors
from daemon.config.sanity import MAX_DEPTH, depth_error, host_errors, shape_errors
from daemon.config.sync import EnrichConfig, OrderingConfig, check_enrich, check_ordering
from daemon.config.units import Duration, Size, dec_hook, schema_hook
from daemon.config.url_credentials import credential_paths
from daemon.errors import ConfigError
from daemon.telemetry import metrics
from daemon.telemetry.masking import RULE_PATTERN


class StoreConfig(Section, frozen=True):
    """The SQLite outbox that sits between every stage."""

    path: Annotated[
        str, Meta(description="SQLite file; relative paths resolve from the config's folder.")
    ] = "var/ferry.db"
    durability: Annotated[
        Literal["full", "normal"],
        Meta(
            description="`full`: fsync every commit (synchronous=FULL). `normal`: may lose the last "
            "commits on power loss, never on a process crash."
        ),
    ] = "full"
    retention: Annotated[Duration, Meta(description="How long delivered rows are kept before pruning.")] = (
        default(Duration(3600))
    )
    archive: Annotated[
        Duration,
        Meta(
            description="How long every event is kept after receipt even once nothing refers to it, "
            "so `ferry ctl replay` can send it again; `0s`: events go with their deliveries."
        ),
    ] = default(Duration(0))
    dedup_window: Annotated[
        Duration, Meta(description="How long an idempotency key is remembered for webhook de-duplication.")
    ] = default(Duration(86400))
    audit_retention: Annotated[
        Duration,
        Meta(
            description="How long `ferry ctl audit` rows (commands that changed something, refused "
            "control connections) are kept before pruning."
        ),
    ] = default(Duration(90 * 86400))
    max_batch: Annotated[
        int, Meta(ge=1, le=100_000, description="Most write requests group-committed in one transaction.")
    ] = 4096
    encryption: Annotated[
        EncryptionConfig | None,
        Meta(description="Encrypt payloads in the store (off when unset); see docs/security.md."),
    ] = None
    verify_on_start: Annotated[
        bool,
        Meta(
            description="Run SQLite's `quick_check` before the first write at startup (about 1 s per GB "
            "of database): a damaged file is refused with its name instead of failing write by write."
        ),
    ] = True


class ListenerConfig(Section, frozen=True):
    """The HTTP/1.1 listener serving every webhook source at `POST /hooks/NAME`."""

    address: Annotated[str, Meta(description="`host:port` to listen on; port 0 picks a free port.")] = (
        "127.0.0.1:8080"
    )
    max_body: Annotated[Size, Meta(description="Largest request body accepted (413 above).")] = default(
        Size(1024**2)
    )
    max_header: Annotated[Size, Meta(description="Largest request head (line + headers) accepted.")] = (
        default(Size(16 * 1024))
    )
    max_depth: Annotated[
        int,
        Meta(
            ge=1,
            le=256,
            description="Deepest nesting of arrays and objects a JSON body may have; deeper bodies get "
            "400 before they are decoded. Every stage that walks an event (decoding, jq, masking, "
            "schema validation) recurses per level, so this keeps them far from Python's recursion "
            "limit (docs/limits.md#limits-at-the-door).",
        ),
    ] = 64
    max_connections: Annotated[
        int,
        Meta(
            ge=1,
            description="Open connections at once. At the limit a new connection closes the one that "
            "has waited longest for its client (idle, or sending slowly); when every one has a request "
            "being stored, the new one is answered 503 and closed.",
        ),
    ] = 1024
    max_pending: Annotated[
        int,
        Meta(
            ge=1,
            description="Requests waiting for their commit at once; beyond it a request is answered "
            "503 with `Retry-After: 1` and nothing of it is stored (load shedding: accepted requests "
            "keep a bounded wait when the store falls behind).",
        ),
    ] = 512
    header_timeout: Annotated[Duration, Meta(description="Time allowed to receive a request's head.")] = (
        default(Duration(10))
    )
    body_timeout: Annotated[Duration, Meta(description="Time allowed to receive a request's body.")] = (
        default(Duration(30))
    )
    idle_timeout: Annotated[
        Duration, Meta(description="How long a keep-alive connection may sit idle between requests.")
    ] = default(Duration(60))
    tls: Annotated[
        ListenerTlsConfig | None,
        Meta(
            description="Serve HTTPS with this certificate and key (table below); a reload re-reads "
            "them (the one `[listener]` key a reload applies). Unset: plain HTTP."
        ),
    ] = None


class ControlConfig(Section, frozen=True):
    """The local control socket used by `ferry ctl`."""

    socket: Annotated[
        str,
        Meta(
            description="Unix socket path (mode 0660); relative paths resolve from the config's folder. "
            "Left at the default under systemd, it is `$RUNTIME_DIRECTORY/ferry.sock`."
        ),
    ] = "var/ferry.sock"
    group: Annotated[
        str | None,
        Meta(
            description="Group (name or gid) whose members may use the socket besides the daemon's "
            "own user and root; the socket file is given this group."
        ),
    ] = None


class SupervisorConfig(Section, frozen=True):
    """How crashed actors are restarted, and when the daemon gives up."""

    max_restarts: Annotated[
        int,
        Meta(
            ge=0,
            description="Restarts allowed (all actors together) within `window` before the "
            "daemon stops with a non-zero exit.",
        ),
    ] = 10
    window: Annotated[Duration, Meta(description="Sliding window for `max_restarts`.")] = default(
        Duration(60)
    )
    initial_backoff: Annotated[Duration, Meta(description="First restart delay; doubles per restart.")] = (
        default(Duration(0.1))
    )
    max_backoff: Annotated[Duration, Meta(description="Longest restart delay.")] = default(Duration(10))
    quarantine_after: Annotated[
        int,
        Meta(
            ge=1,
            description="A stage that crashed (or whose process died) this many times while working "
            "on the same event dead-letters that event as `poison` instead of trying it again "
            '(docs/reliability.md, "Poison events").',
        ),
    ] = 3
    shutdown_grace: Annotated[
        Duration,
        Meta(
            description="On SIGTERM, how long in-flight deliveries may take before they are cut off "
            "(they stay in the store and resume on the next start)."
        ),
    ] = default(Duration(10))


class TelemetryConfig(Section, frozen=True):
    """OpenTelemetry traces and metrics over OTLP, and logs; `OTEL_*` variables apply (observability.md)."""

    traces: Annotated[
        bool,
        Meta(
            description="Record traces (one per event, `sample_ratio` of them) and export them over OTLP. "
            "At the default ratio tracing costs about a tenth of ingest throughput; every event traced "
            "(`sample_ratio = 1`) about half (performance.md#tracing-on-vs-off)."
        ),
    ] = True
    metrics: Annotated[bool, Meta(description="Export metrics over OTLP every `metrics_interval`.")] = True
    prometheus: Annotated[
        bool,
        Meta(
            description="Also serve the metrics as Prometheus text at `GET /metrics` on the listener "
            "(read at each scrape; independent of `metrics`)."
        ),
    ] = False
    endpoint: Annotated[
        Annotated[str, Meta(pattern=r"^https?://")] | None,
        Meta(
            description="OTLP/HTTP base URL (`/v1/traces`, `/v1/metrics` are appended); unset: "
            "`OTEL_EXPORTER_OTLP_ENDPOINT`, else `http://localhost:4318`."
        ),
    ] = None
    sample_ratio: Annotated[
        float,
        Meta(
            ge=0,
            le=1,
            description="Share of new traces recorded (parent-based: an incoming `traceparent` "
            "decides for its own trace). Events left out cost almost nothing on any hop.",
        ),
    ] = 0.05
    service_name: Annotated[
        str, Meta(min_length=1, description="`service.name` of every span and metric.")
    ] = "ferry"
    export_timeout: Annotated[
        Duration, Meta(description="Longest one export may take; also bounds the flush at shutdown.")
    ] = default(Duration(5))
    max_queue: Annotated[
        int,
        Meta(
            ge=1,
            le=1_000_000,
            description="Finished spans waiting for export; beyond it spans are dropped (counted). "
            "Each costs about 4.5 KB of memory: with no collector reachable the queue fills, ~37 MB at "
            "8192 (reliability.md#memory-during-an-outage).",
        ),
    ] = 8192
    metrics_interval: Annotated[Duration, Meta(description="How often metrics are exported.")] = default(
        Duration(30)
    )
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"],
        Meta(description="Lowest level logged to stderr (`ferry run --log-level` overrides it)."),
    ] = "info"
    log_outcomes: Annotated[
        Literal["all", "dead"],
        Meta(
            description="`all`: one log line per final outcome (`delivered` at info, "
            "`delivery dead-lettered` at error): per delivery, or per batch request (or group of "
            "outcomes committed together) naming its deliveries. "
            "`dead`: dead letters only (transforms.md#confirmation-and-logging)."
        ),
    ] = "all"
    mask: Annotated[
        list[Annotated[str, Meta(pattern=RULE_PATTERN)]],
        Meta(
            description='Payload fields shown as `"***"` outside the store (logs, `ferry ctl dlq show`, '
            "`ferry ctl tap`, the audit trail): a bare name masks that key at any depth (any case), "
            "`$.a.b` one path from the root (observability.md#masking)."
        ),
    ] = []


class WebhookSourceConfig(Section, frozen=True, tag="webhook", tag_field="type"):
    """Receives events at `POST /hooks/NAME` (or `path`); answers 202 once the event is committed."""

    path: (
        Annotated[str, Meta(pattern=r"^/[A-Za-z0-9/_.-]*$", description="URL path; default `/hooks/NAME`.")]
        | None
    ) = None
    idempotency_header: Annotated[
        str | None,
        Meta(
            description="Request header whose value de-duplicates deliveries of the same webhook; "
            "a repeat answers the original event id and stores nothing. Empty to disable."
        ),
    ] = "Idempotency-Key"
    verify: Annotated[
        VerifyConfig | None,
        Meta(
            description="Check each request's signature or credentials before it is read further "
            "(401 and nothing stored when it fails); see the `verify` tables below and docs/security.md."
        ),
    ] = None


SourceConfig = WebhookSourceConfig | PollSourceConfig


class TransformConfig(Section, frozen=True):
    """A jq program applied to every event from `inputs`; each output is one event downstream."""

    inputs: Annotated[list[ComponentName], Meta(min_length=1, description="Sources or transforms to read.")]
    map: Annotated[str, Meta(description="jq program; may emit zero, one or many outputs per event.")] = "."
    max_outputs: Annotated[
        int,
        Meta(
            ge=1,
            le=1_000_000,
            description="Most outputs `map` may give for one event; jq is stopped at the next one and the "
            "event is dead-lettered (`map produced more than N outputs`), so one sender cannot make a "
            "transform hold an unbounded fan-out in memory (docs/limits.md#fan-out).",
        ),
    ] = 10_000
    filter: Annotated[
        str | None,
        Meta(description="jq predicate; events for which it is false or null are dropped (counted)."),
    ] = None
    schema: Annotated[SchemaSpec | None, SCHEMA] = None
    routes: Annotated[
        list[RouteConfig],
        Meta(
            description="Send each output only to some of the sinks reading this transform, by jq "
            'predicate: `[{ when = \'.type == "lead"\', to = ["crm"] }, …]`; the first route whose '
            "`when` is true wins (docs/transforms.md). Empty: every reader gets every output."
        ),
    ] = []
    default_route: Annotated[
        list[ComponentName] | None,
        Meta(description="Sinks for outputs no route matches; unset: those outputs go nowhere (counted)."),
    ] = None
    aggregate: Annotated[
        AggregateConfig | None,
        Meta(description="Group outputs into tumbling windows and emit one event per window."),
    ] = None
    enrich: Annotated[
        EnrichConfig | None,
        Meta(
            description="An HTTP lookup per event, merged in by jq before `schema`, `filter` and `map` "
            "(docs/enrichment-and-ordering.md)."
        ),
    ] = None


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
            description="`lean`: ferry's h11 client for plain JSON requests (fastest). "
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


class Config(Section, frozen=True):
    """A whole ferry configuration file."""

    store: StoreConfig = default(StoreConfig())
    listener: ListenerConfig = default(ListenerConfig())
    control: ControlConfig = default(ControlConfig())
    supervisor: SupervisorConfig = default(SupervisorConfig())
    telemetry: TelemetryConfig = default(TelemetryConfig())
    sources: dict[ComponentName, SourceConfig] = {}
    transforms: dict[ComponentName, TransformConfig] = {}
    sinks: dict[ComponentName, SinkConfig] = {}
    rate_limits: dict[ComponentName, RateLimitConfig] = {}
    alerting: AlertingConfig = default(AlertingConfig())
    alerts: dict[ComponentName, AlertRuleConfig] = {}
    channels: dict[ComponentName, ChannelConfig] = {}


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config plus where it came from."""

    config: Config
    path: Path | None
    text: str = field(repr=False, default="")

    @property
    def warnings(self) -> list[str]:
        """What is valid but unwise: literal secrets in the file, credentials written into a URL."""
        return [
            *(
                f"{path}: a literal secret in the config file; use env:NAME, file:PATH or credential:NAME"
                for path in secrets.literal_paths(self.config)
            ),
            *(
                f"{path}: credentials in a URL; put them in `auth` with a secret reference "
                '(auth = { type = "basic", username = …, password = "env:NAME" }); they are scrubbed '
                "from what ferry shows, but stay in the file"
                for path, _ in credential_paths(self.config)
            ),
        ]


_SECTIONS: dict[str, Any] = {
    "store": StoreConfig,
    "listener": ListenerConfig,
    "control": ControlConfig,
    "supervisor": SupervisorConfig,
    "telemetry": TelemetryConfig,
    "alerting": AlertingConfig,
}
_COLLECTIONS: dict[str, Any] = {
    "sources": SourceConfig,
    "transforms": TransformConfig,
    "sinks": SinkConfig,
    "rate_limits": RateLimitConfig,
    "alerts": AlertRuleConfig,
    "channels": ChannelConfig,
}
_UNTYPED = frozenset({"transforms", "rate_limits", "alerts"})  # collections whose tables have no `type`
_PATH_IN_MESSAGE = re.compile(r" - at `\$(.*)`$")
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(.*)`$")


def _convert(value: Any, type_: Any, path: str, errors: list[str]) -> Any:
    """Decode one part of the raw TOML, recording a path-prefixed error instead of raising."""
    try:
        return msgspec.convert(value, type_, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _PATH_IN_MESSAGE.search(message)
        if match:
            message, path = message[: match.start()], path + match.group(1)
        unknown = _UNKNOWN_FIELD.match(message)
        if unknown:
            message, path = "unknown key", f"{path}.{unknown.group(1)}"
        errors.append(f"{path}: {message}")
        return None


def parse(text: str, *, base_dir: Path | None = None, read_secrets: bool = True) -> Config:
    """Decode and validate config TOML; raise `ConfigError` listing every problem found.

    With `read_secrets` every secret reference is read (`daemon.config.secrets.bind`); one that
    cannot be is an error. Without it references stay unread (`ferry ctl` needs none).
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"$: invalid TOML: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"$: invalid TOML: nested more than {MAX_DEPTH} levels deep"]) from None
    errors: list[str] = [problem for problem in [depth_error(raw)] if problem]
    if errors:
        raise ConfigError(errors)
    known = set(_SECTIONS) | set(_COLLECTIONS)
    errors.extend(f"$.{key}: unknown section" for key in raw if key not in known)
    parts: dict[str, Any] = {}
    for key, type_ in _SECTIONS.items():
        if key in raw:
            parts[key] = _convert(raw[key], type_, f"$.{key}", errors)
    for key, type_ in _COLLECTIONS.items():
        table = raw.get(key, {})
        if not isinstance(table, dict):
            errors.append(f"$.{key}: expected a table of named components")
            continue
        decoded = {}
        for name, body in table.items():
            path = f"$.{key}.{name}"
            if not re.match(NAME_RE, name):
                errors.append(f"{path}: invalid name (letters, digits, '_' and '-', at most 63)")
                continue
            if key not in _UNTYPED and isinstance(body, dict) and "type" not in body:
                errors.append(f"{path}.type: missing (what kind of {key[:-1]} is this?)")
                continue
            decoded[name] = _convert(body, type_, path, errors)
        parts[key] = decoded
    if errors:
        raise ConfigError(errors)
    config = Config(**parts)
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    errors.extend(_semantic_errors(config))
    if read_secrets:
        errors.extend(secrets.bind(config, base_dir=base_dir))
        errors.extend(host_errors(config))
    errors.extend(shape_errors(config))
    if errors:
        raise ConfigError(errors)
    if read_secrets:
        errors.extend(_verifier_errors(config))
        from daemon.http.auth import secret_errors

        errors.extend(secret_errors(config.store.encryption, _outbound(config)))
        if errors:
            raise ConfigError(errors)
    return config


def _verifier_errors(config: Config) -> Iterator[str]:
    """Keys that read fine but cannot be used (a PEM that is not a key, a JWKS file that is not one)."""
    from actors.webhook.tls import server_context
    from actors.webhook.verify import build

    try:
        server_context(config.listener.tls)
    except ConfigError as exc:
        yield from exc.problems

    for name, source in config.sources.items():
        if isinstance(source, WebhookSourceConfig) and source.verify is not None:
            try:
                build(source.verify, f"$.sources.{name}.verify")
            except ConfigError as exc:
                yield from exc.problems


def _outbound(config: Config) -> Iterator[tuple[str, AuthConfig | None, TlsConfig | None]]:
    """Every component that calls out over HTTP: (TOML path, its auth, its tls)."""
    for name, sink in config.sinks.items():
        if isinstance(sink, HttpSinkConfig):
            yield f"$.sinks.{name}", sink.auth, sink.tls
    for name, source in config.sources.items():
        if isinstance(source, PollSourceConfig):
            yield f"$.sources.{name}", source.auth, source.tls
    for name, transform in config.transforms.items():
        if transform.enrich is not None:
            yield f"$.transforms.{name}.enrich", transform.enrich.auth, None


def load(path: str | Path, *, read_secrets: bool = True) -> LoadedConfig:
    """Read, decode and validate a config file; relative paths in it resolve from its folder.

    Secrets are read too unless `read_secrets` is false (see `parse`).
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"$: cannot read {file}: {exc}"]) from None
    config = parse(text, base_dir=file.resolve().parent, read_secrets=read_secrets)
    return LoadedConfig(config, file.resolve(), text)


def webhook_path(name: str, source: WebhookSourceConfig) -> str:
    """The URL path a webhook source is served at."""
    return source.path or f"/hooks/{name}"


def _semantic_errors(config: Config) -> Iterator[str]:
    """Cross-component checks: names, wiring, cycles, paths, jq programs, alert rules."""
    yield from check_alerts(config, metrics.catalogue())
    owners: dict[str, str] = {}
    for kind in ("sources", "transforms", "sinks"):
        for name in getattr(config, kind):
            if name in owners:
                yield f"$.{kind}.{name}: name already used by $.{owners[name]}.{name}"
            else:
                owners[name] = kind
    producers = set(config.sources) | set(config.transforms)
    for kind, table in (("transforms", config.transforms), ("sinks", config.sinks)):
        for name, component in table.items():
            for index, upstream in enumerate(component.inputs):
                where = f"$.{kind}.{name}.inputs[{index}]"
                if upstream == name:
                    yield f"{where}: a component cannot read its own output"
                elif upstream in config.sinks:
                    yield f"{where}: {upstream!r} is a sink; inputs must be sources or transforms"
                elif upstream not in producers:
                    yield f"{where}: unknown input {upstream!r}"
            if len(set(component.inputs)) != len(component.inputs):
                yield f"$.{kind}.{name}.inputs: lists the same input twice"
    yield from _cycle_errors(config)
    seen_paths: dict[str, str] = {}
    for name, source in config.sources.items():
        if isinstance(source, PollSourceConfig):
            yield from poll_errors(name, source)
        elif isinstance(source, WebhookSourceConfig):
            path = webhook_path(name, source)
            if path in ("/healthz", "/readyz", "/metrics"):
                yield f"$.sources.{name}.path: {path} is reserved"
            elif path in seen_paths:
                yield f"$.sources.{name}.path: {path} is already served by source {seen_paths[path]!r}"
            seen_paths[path] = name
            if source.verify is not None:
                yield from verify_errors(f"$.sources.{name}.verify", source.verify)
    for name, transform in config.transforms.items():
        for key in ("map", "filter"):
            program = getattr(transform, key)
            if program is not None:
                try:
                    jq.compile(program)
                except ValueError as exc:
                    yield f"$.transforms.{name}.{key}: invalid jq program: {exc}"
        yield from check_transform(name, transform, {sink: s.inputs for sink, s in config.sinks.items()})
        if transform.enrich is not None:
            yield from check_enrich(f"$.transforms.{name}", transform.enrich, config.rate_limits)
            if transform.aggregate is not None:
                yield (
                    f"$.transforms.{name}.enrich: not with `aggregate` in the same transform "
                    "(enrich in a transform that feeds the aggregating one)"
                )
    for name, sink in config.sinks.items():
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
    yield from limit_errors(
        config.rate_limits,
        {"sources": config.sources, "transforms": config.transforms, "sinks": config.sinks},
    )
    if config.supervisor.initial_backoff > config.supervisor.max_backoff:
        yield "$.supervisor.initial_backoff: larger than max_backoff"
    if _split_address(config.listener.address) is None:
        yield f"$.listener.address: expected host:port, got {config.listener.address!r}"


def _cycle_errors(config: Config) -> Iterator[str]:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished

    def visit(name: str, trail: list[str]) -> Iterator[str]:
        state[name] = 1
        for upstream in config.transforms[name].inputs:
            if upstream not in config.transforms or upstream == name:
                continue
            if state.get(upstream) == 1:
                cycle = [*trail[trail.index(upstream) :], upstream] if upstream in trail else [name, upstream]
                yield f"$.transforms.{name}.inputs: cycle {' -> '.join(cycle)}"
            elif state.get(upstream) is None:
                yield from visit(upstream, [*trail, upstream])
        state[name] = 2

    for name in config.transforms:
        if name not in state:
            yield from visit(name, [name])


def _split_address(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return None
    return host.strip("[]") or "0.0.0.0", int(port)


def listen_address(config: Config) -> tuple[str, int]:
    """The listener's (host, port), validated by `parse`."""
    address = _split_address(config.listener.address)
    assert address is not None
    return address


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    def resolve(value: str) -> str:
        return str(base_dir / value) if not Path(value).is_absolute() else value

    sinks = {
        name: msgspec.structs.replace(sink, path=resolve(sink.path))
        if isinstance(sink, FileSinkConfig)
        else resolve_tls(sink, resolve)
        for name, sink in config.sinks.items()
    }
    tls = config.listener.tls
    sources = {
        name: msgspec.structs.replace(source, verify=resolve_jwks(source.verify, base_dir))
        if isinstance(source, WebhookSourceConfig) and source.verify is not None
        else resolve_tls(source, resolve)
        if isinstance(source, PollSourceConfig)
        else source
        for name, source in config.sources.items()
    }
    transforms = {
        name: msgspec.structs.replace(transform, schema=resolve(transform.schema))
        if isinstance(transform.schema, str)
        else transform
        for name, transform in config.transforms.items()
    }
    return msgspec.structs.replace(
        config,
        store=msgspec.structs.replace(config.store, path=resolve(config.store.path)),
        listener=msgspec.structs.replace(
            config.listener, tls=msgspec.structs.replace(tls, cert=resolve(tls.cert)) if tls else None
        ),
        sources=sources,
        control=msgspec.structs.replace(config.control, socket=resolve(config.control.socket)),
        sinks=sinks,
        transforms=transforms,
    )


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file."""
    return msgspec.json.schema(Config, schema_hook=schema_hook)


def downstream(config: Config) -> dict[str, tuple[list[str], list[str]]]:
    """For each producer (source or transform): the transforms and the sinks that read it."""
    wiring: dict[str, tuple[list[str], list[str]]] = {
        name: ([], []) for name in [*config.sources, *config.transforms]
    }
    for name, transform in config.transforms.items():
        for upstream in transform.inputs:
            wiring[upstream][0].append(name)
    for name, sink in config.sinks.items():
        for upstream in sink.inputs:
            wiring[upstream][1].append(name)
    return wiring
