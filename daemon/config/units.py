"""Typed durations and sizes for the config: `"500ms"`, `"30s"`, `"5m"`, `"1MiB"`.

Both are `float`/`int` subclasses, so the rest of the code uses them as plain
seconds and bytes; only the config decoder knows they came from strings.
"""

from __future__ import annotations

import math
import re
from typing import Any

from daemon.config.secrets import SecretRef
from daemon.config.secrets import schema as secret_schema

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}


class Duration(float):
    """A span of time in seconds, written in config as `"250ms"`, `"30s"`, `"5m"`, `"1h"` or `"2d"`."""

    @classmethod
    def parse(cls, value: object) -> Duration:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise TypeError(f"expected a duration like '500ms' or '30s', got {type(value).__name__}")
        if isinstance(value, int | float):
            seconds = float(value) if abs(value) < 1e300 else math.inf
        else:
            match = _DURATION_RE.match(value)
            if match is None:
                raise ValueError(
                    f"invalid duration {value!r}: use a number and ms, s, m, h or d (e.g. '500ms')"
                )
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        if not math.isfinite(seconds):
            raise ValueError(f"invalid duration {value!r}: must be a finite number of seconds")
        if seconds < 0:
            raise ValueError("a duration cannot be negative")
        return cls(seconds)

    def __repr__(self) -> str:
        return f"Duration({float(self)!r}s)"


class Size(int):
    """A number of bytes, written in config as `"512KiB"`, `"1MiB"`, `"10MB"` or a plain integer."""

    @classmethod
    def parse(cls, value: object) -> Size:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise TypeError(f"expected a size like '1MiB', got {type(value).__name__}")
        if isinstance(value, int):
            if value < 0:
                raise ValueError("a size cannot be negative")
            return cls(value)
        match = _SIZE_RE.match(value)
        if match is None:
            raise ValueError(f"invalid size {value!r}: use an integer and B, KiB, MiB, GiB, KB, MB or GB")
        return cls(int(match.group(1)) * _SIZE_UNITS[match.group(2)])


def dec_hook(type_: type, obj: Any) -> Any:
    """msgspec decode hook turning config strings into `Duration`, `Size` and `SecretRef`."""
    if type_ is Duration:
        return Duration.parse(obj)
    if type_ is Size:
        return Size.parse(obj)
    if type_ is SecretRef:
        return SecretRef.parse(obj)
    raise NotImplementedError(f"no decoder for {type_!r}")


def schema_hook(type_: type) -> dict[str, Any]:
    """msgspec JSON-Schema hook describing `Duration` and `Size` as the strings users write."""
    if type_ is Duration:
        return {"type": "string", "pattern": _DURATION_RE.pattern, "description": "duration, e.g. '500ms'"}
    if type_ is Size:
        return {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": _SIZE_RE.pattern},
            ],
            "description": "size in bytes, e.g. '1MiB'",
        }
    if type_ is SecretRef:
        return secret_schema()
    raise NotImplementedError(f"no schema for {type_!r}")
