"""Event validation against JSON Schema: `jsonschema-rs` decides, `jsonschema` words the violations.

A transform's `schema` is a file path or an inline table; `load_schema` reads it and checks
that it is valid JSON Schema (`ferry check` reports `SchemaProblem` as a config error), and
`EventValidator` lists *every* violation of one event, each as `PATH: message`
(`$.email: 'x' is not a 'email'`), in a stable order.

Why two libraries: `jsonschema-rs` (Rust) checks a typical event in about a microsecond,
~50x faster than the pure-Python `jsonschema`, which would otherwise halve a transform's
throughput; valid events (the common case) cost only that. For an invalid event, the
violations are listed by `jsonschema` (its messages are the ones documented and tested);
should the two disagree on an event that `jsonschema-rs` rejects, its own messages are used,
so an event is never dead-lettered without a reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, final

import jsonschema
import jsonschema_rs
import msgspec
from jsonschema.protocols import Validator

MESSAGE_CHARS: Final = 200
"""A violation's message is cut here: jsonschema quotes the offending value, which may be large."""


class SchemaProblem(Exception):
    """A schema that cannot be used: unreadable, not JSON, or not valid JSON Schema."""


def load_schema(spec: str | dict[str, Any]) -> dict[str, Any]:
    """The schema `spec` names (a file path) or is (a table), checked against its metaschema."""
    schema: dict[str, Any]
    if isinstance(spec, str):
        path = Path(spec)
        try:
            decoded = msgspec.json.decode(path.read_bytes())
        except OSError as exc:
            raise SchemaProblem(f"cannot read {path}: {exc.strerror or exc}") from None
        except msgspec.DecodeError as exc:
            raise SchemaProblem(f"{path} is not JSON: {exc}") from None
        if not isinstance(decoded, dict):
            raise SchemaProblem(f"{path}: a schema must be a JSON object, got {type(decoded).__name__}")
        schema = decoded
    else:
        schema = spec
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "".join(f"[{part!r}]" for part in exc.path)
        at = f" at {where}" if where else ""
        raise SchemaProblem(f"not valid JSON Schema: {exc.message}{at}") from None
    try:
        jsonschema_rs.validator_for(schema, validate_formats=True)
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SchemaProblem(f"cannot be compiled: {first_line}") from None
    return schema


@final
class EventValidator:
    """Validates decoded events against one schema (formats checked)."""

    def __init__(self, schema: dict[str, Any]) -> None:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        self._validator: Validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
        self._fast = jsonschema_rs.validator_for(schema, validate_formats=True)

    def violations(self, event: Any) -> list[str]:
        """Every way `event` breaks the schema, as `PATH: message`, sorted by path; [] if valid."""
        if self._fast.is_valid(event):
            return []
        found = [(error.json_path, _cut(error.message)) for error in self._validator.iter_errors(event)]
        if not found:  # the two libraries disagree: give jsonschema-rs's own reasons
            found = [(_json_path(e.instance_path), _cut(e.message)) for e in self._fast.iter_errors(event)]
        return [f"{path}: {message}" for path, message in sorted(found)]


def _json_path(parts: Any) -> str:
    return "$" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)


def _cut(message: str) -> str:
    return message if len(message) <= MESSAGE_CHARS else message[: MESSAGE_CHARS - 1] + "…"


def describe(violations: list[str]) -> str:
    """A dead letter's error text for an invalid event: `schema: N violation(s): a; b; …`."""
    return f"schema: {len(violations)} violation(s): " + "; ".join(violations)
