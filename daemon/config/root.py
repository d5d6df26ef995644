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

import os
import re
import socket
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jq
import msgspec

from daemon.config import secrets
from daemon.config.auth import AuthConfig, TlsConfig, resolve_tls
from daemon.config.base import NAME_RE, ComponentName, Section, default
from daemon.config.kinds import (
    AlertingConfig,
    AlertRuleConfig,
    ChannelConfig,
    FileSinkConfig,
    HttpSinkConfig,
    ListenerConfig,
    PollSourceConfig,
    SinkConfig,
    SourceConfig,
    TransformConfig,
    WebhookSourceConfig,
    check_alerts,
    check_transform,
    key_errors,
    poll_errors,
    resolve_jwks,
    sink_errors,
    verify_errors,
    webhook_path,
)
from daemon.config.limits import RateLimitConfig, limit_errors
from daemon.config.sanity import MAX_DEPTH, depth_error, host_errors, shape_errors
from daemon.config.sections import (
    ClusterConfig,
    ControlConfig,
    StoreConfig,
    SupervisorConfig,
    TelemetryConfig,
)
from daemon.config.sync import check_enrich
from daemon.config.units import dec_hook, schema_hook
from daemon.config.url_credentials import credential_paths
from daemon.errors import ConfigError
from daemon.telemetry import metrics


class Config(Section, frozen=True):
    """A whole ferry configuration file."""

    store: StoreConfig = default(StoreConfig())
    cluster: ClusterConfig = default(ClusterConfig())
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
    "cluster": ClusterConfig,
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
        errors.extend(key_errors(config.listener.tls, config.sources))
        from daemon.http.auth import secret_errors

        errors.extend(secret_errors(config.store.encryption, _outbound(config)))
        if errors:
            raise ConfigError(errors)
    return config


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
        yield from sink_errors(name, sink)
    yield from limit_errors(
        config.rate_limits,
        {"sources": config.sources, "transforms": config.transforms, "sinks": config.sinks},
    )
    if config.supervisor.initial_backoff > config.supervisor.max_backoff:
        yield "$.supervisor.initial_backoff: larger than max_backoff"
    if _split_address(config.listener.address) is None:
        yield f"$.listener.address: expected host:port, got {config.listener.address!r}"
    if config.store.backend == "postgres" and config.store.url is None:
        yield '$.store.url: required with backend = "postgres" (e.g. url = "env:FERRY_DATABASE_URL")'
    if config.store.backend == "postgres":
        lease = config.cluster.delivery_lease
        for name, sink in config.sinks.items():
            if isinstance(sink, HttpSinkConfig) and sink.timeout >= lease:
                yield (
                    f"$.sinks.{name}.timeout: {sink.timeout:g}s is not less than [cluster] "
                    f"delivery_lease ({lease:g}s): a claim must outlast the request it is sent in"
                )
    if config.store.backend == "sqlite" and config.store.url is not None:
        yield '$.store.url: only for backend = "postgres"; SQLite uses `path` (remove url or set the backend)'


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


def node_id(config: Config) -> str:
    """This node's id in a shared store: `[cluster] node_id`, else `HOSTNAME:PORT` of the listener
    (`HOSTNAME:pPID` when the port is 0, i.e. chosen at bind time: then not stable across restarts)."""
    if config.cluster.node_id is not None:
        return config.cluster.node_id
    _, port = listen_address(config)
    return f"{socket.gethostname()}:{port}" if port else f"{socket.gethostname()}:p{os.getpid()}"


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
