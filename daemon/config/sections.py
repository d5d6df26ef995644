"""The runtime's own sections of the config file: `[store]`, `[cluster]`, `[control]`, `[supervisor]`,
`[telemetry]`.

Each is one frozen Struct whose field descriptions are the config reference (`ferry config-docs`);
none of them can change in a running process (a reload that changes one is refused).
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from daemon.config.auth import EncryptionConfig
from daemon.config.base import Section, default
from daemon.config.secrets import SecretRef
from daemon.config.units import Duration
from daemon.telemetry.masking import RULE_PATTERN


class StoreConfig(Section, frozen=True):
    """The outbox that sits between every stage: a SQLite file (one node) or a PostgreSQL database
    that several nodes share (docs/architecture.md#the-store-interface)."""

    backend: Annotated[
        Literal["sqlite", "postgres"],
        Meta(
            description="`sqlite`: the file at `path` (one node). `postgres`: the database at `url`, "
            "which several ferry nodes may share; `path`, `durability` and `verify_on_start` are "
            "SQLite's and are ignored (PostgreSQL commits with synchronous_commit on)."
        ),
    ] = "sqlite"
    url: Annotated[
        SecretRef | None,
        Meta(
            description="PostgreSQL connection URL (`postgresql://user@host:5432/db`) as a secret "
            "reference (`env:FERRY_DATABASE_URL`): it may hold a password. Required with "
            '`backend = "postgres"`; an error with `sqlite`.'
        ),
    ] = None
    path: Annotated[
        str, Meta(description="SQLite file; relative paths resolve from the config's folder.")
    ] = "var/ferry.db"
    durability: Annotated[
        Literal["full", "normal"],
        Meta(
            description="SQLite: `full`: fsync every commit (synchronous=FULL). `normal`: may lose the "
            "last commits on power loss, never on a process crash."
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


class ClusterConfig(Section, frozen=True):
    """This node among several sharing one PostgreSQL outbox (`[store] backend = "postgres"`)."""

    node_id: Annotated[
        Annotated[str, Meta(min_length=1, max_length=200)] | None,
        Meta(
            description="This node's stable name in the shared database: the owner of its delivery "
            "claims. Default: `HOSTNAME:PORT` of the listener (`HOSTNAME:pPID` with port 0). Each "
            "running node needs its own; a node restarted under the same id takes its own claims "
            "back at once instead of after `delivery_lease`.",
        ),
    ] = None
    delivery_lease: Annotated[
        Duration,
        Meta(
            description="How long a claimed delivery stays this node's without being fetched again: a "
            "killed node's deliveries are resent by the others after it. Must be longer than every "
            "http sink's `timeout` (a claim is renewed before a send when it might not outlast it)."
        ),
    ] = default(Duration(60))
    heartbeat: Annotated[
        Duration,
        Meta(
            description="How often a node writes its heartbeat, renews the leases it holds, tries to take "
            "the free ones it wants and reads the cluster-wide pauses and drain (one transaction)."
        ),
    ] = default(Duration(1))
    lease_ttl: Annotated[
        Duration,
        Meta(
            description="How long a singleton's lease (a transform's cursor, a poll source, the alerter) "
            "lasts without renewal, on the database's clock. A node that dies loses its leases after at "
            "most this long; another node takes them at its next heartbeat, so failover takes at most "
            "`lease_ttl + heartbeat` (plus the actor's start). At least 3 heartbeats."
        ),
    ] = default(Duration(5))
    dead_after: Annotated[
        Duration,
        Meta(
            description="A node whose last heartbeat is older than this (database clock) is shown dead "
            "by `ferry ctl status`; one dead for an hour is forgotten."
        ),
    ] = default(Duration(10))
    database_timeout: Annotated[
        Duration,
        Meta(
            description="Longest a heartbeat's connect or transaction may take; a node cut off from the "
            "database stops its singletons once its leases run out, whatever this is."
        ),
    ] = default(Duration(2))

    def __post_init__(self) -> None:
        if self.heartbeat <= 0:
            raise ValueError("heartbeat must be more than 0s")
        if self.lease_ttl < 3 * self.heartbeat:
            raise ValueError(
                f"lease_ttl ({self.lease_ttl:g}s) must be at least 3 heartbeats ({3 * self.heartbeat:g}s), "
                "or one late heartbeat loses every lease"
            )
        if self.database_timeout <= 0 or self.database_timeout >= self.lease_ttl:
            raise ValueError("database_timeout must be more than 0s and less than lease_ttl")


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
