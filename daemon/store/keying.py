"""Per-key ordering's pure parts: reading a payload's key and version, and what a fetch found.

Backend-neutral (no I/O): each backend's ordered fetch (`daemon.store.ordering` for SQLite,
`daemon.store.postgres.ordering`) keys rows with `Ordering.identify_all` and returns `Fetched`.
The guarantees are stated in `daemon.store.ordering`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple, final

import jq
import msgspec

from daemon.config.sync import OrderingConfig
from daemon.store.types import Due

Version = float | str


_encode = msgspec.json.Encoder().encode


_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


class OrderingError(ValueError):
    """A delivery's key or version cannot be read; the message is its dead-letter reason."""


def number_version(value: Any) -> float:
    """A `number` version: a JSON number or a string holding one (finite)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise OrderingError(f"is not a number: {_show(value)}")
    if isinstance(value, str) and not _NUMBER.match(value):
        raise OrderingError(f"is not a number: {_show(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise OrderingError(f"is not a finite number: {_show(value)}")
    return number


def rfc3339_version(value: Any) -> str:
    """An `rfc3339` version as a fixed-width UTC string (`2026-11-25T15:20:38.000000Z`): ordered as text.

    Takes what `datetime.fromisoformat` takes with a date, a time and a zone (`Z`, `+00:00`,
    and Salesforce's `+0000`); digits past microseconds are dropped.
    """
    if not isinstance(value, str):
        raise OrderingError(f"is not an RFC 3339 timestamp: {_show(value)}")
    try:
        instant = datetime.fromisoformat(value)
    except ValueError:
        raise OrderingError(f"is not an RFC 3339 timestamp: {_show(value)}") from None
    if len(value) <= 10:
        raise OrderingError(f"is a date without a time: {_show(value)}")
    if instant.tzinfo is None:
        raise OrderingError(f"has no time zone (add Z or an offset): {_show(value)}")
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def string_version(value: Any) -> str:
    if not isinstance(value, str):
        raise OrderingError(f"is not a string: {_show(value)}")
    return value


PARSERS: dict[str, Callable[[Any], Version]] = {
    "number": number_version,
    "rfc3339": rfc3339_version,
    "string": string_version,
}


def _show(value: Any) -> str:
    text = _encode(value).decode()
    return text if len(text) <= 80 else text[:77] + "..."


class Fetched(NamedTuple):
    """What one ordered fetch found: rows to send, and what it settled on the way."""

    rows: list[Due]
    more: bool  # rows were left unkeyed or unsettled: fetch again at once
    stale_ids: list[str]  # delivery ids marked stale
    dead_letters: list[tuple[str, str]]  # (delivery id, reason) of rows that could not be keyed

    @property
    def stale(self) -> int:
        return len(self.stale_ids)

    @property
    def dead(self) -> int:
        return len(self.dead_letters)


@final
class Ordering:
    """One sink's ordering: reads keys and versions, and picks each key's next delivery."""

    def __init__(self, config: OrderingConfig) -> None:
        self.config = config
        self._program = jq.compile(f"[[{config.key}], [{config.version}]]")
        self._parse = PARSERS[config.compare]

    def __repr__(self) -> str:
        config = self.config
        return f"<Ordering key={config.key} version={config.version} compare={config.compare}>"

    def identify(self, payload: bytes) -> tuple[str, Version]:
        """(key, version) of one payload; raises `OrderingError` with the dead-letter reason."""
        try:
            (result,) = self._program.input_text(payload.decode()).all()
        except (ValueError, UnicodeDecodeError) as exc:
            raise OrderingError(f"ordering: jq: {' '.join(str(exc).split())}") from None
        return self._check(result)

    def _check(self, result: list[list[Any]]) -> tuple[str, Version]:
        keys, versions = result
        config = self.config
        if len(keys) != 1:
            raise OrderingError(f"ordering: key {config.key} gave {len(keys)} values, expected one")
        key = keys[0]
        if isinstance(key, bool) or not isinstance(key, str | int | float):
            raise OrderingError(f"ordering: key {config.key} is {_show(key)}, expected a string or number")
        if len(versions) != 1:
            raise OrderingError(
                f"ordering: version {config.version} gave {len(versions)} values, expected one"
            )
        try:
            version = self._parse(versions[0])
        except OrderingError as exc:
            raise OrderingError(f"ordering: version {config.version} of key {_show(key)} {exc}") from None
        return (key if isinstance(key, str) else _encode(key).decode()), version

    def identify_all(self, payloads: Sequence[bytes]) -> list[tuple[str, Version] | OrderingError]:
        """`identify` for many payloads, in one jq run when none fails."""
        try:
            results = self._program.input_text("\n".join(p.decode() for p in payloads)).all()
        except (ValueError, UnicodeDecodeError):
            results = None
        if results is None or len(results) != len(payloads):
            return [self._safely(self.identify, payload) for payload in payloads]
        return [self._safely(self._check, result) for result in results]

    @staticmethod
    def _safely(fn: Callable[[Any], tuple[str, Version]], arg: Any) -> tuple[str, Version] | OrderingError:
        try:
            return fn(arg)
        except OrderingError as exc:
            return exc
