"""Checks that catch at load time what `ferry run` would otherwise fail on later.

Each finding is a config error naming its TOML path, so `ferry check` reports it and `ferry run`
exits 2 with the message (a config error: systemd's `RestartPreventExitStatus=2` stops it from
restarting in a loop) instead of failing later with exit 1 or a traceback.

Shape (`shape_errors`, whatever the host):
    - TOML nested more than `MAX_DEPTH` levels (`depth_error`, on the raw TOML: every later
      step walks the tree recursively);
    - a number that is not finite (`inf`, `nan`) anywhere: TOML allows them, no setting means them
      (`rate = inf` divided by zero in every `ferry ctl status`);
    - a header name that is not an HTTP token, or a header value holding CR, LF or NUL (header
      injection: the request would be refused or split);
    - a `[listener]` timeout of 0s (every connection would be dropped at once) and a
      `max_header` below `MIN_HEADER` bytes (no request head fits).

Host (`host_errors`, when the config is loaded to run or check, not by `ferry ctl`):
    - `[control] group` naming a group this machine does not have;
    - a file sink whose `path` is a folder.
"""

from __future__ import annotations

import grp
import math
import os
import re
from collections.abc import Iterator
from typing import Any, Final

import msgspec

from daemon.config.secrets import SecretRef

__all__ = ["MAX_DEPTH", "MIN_HEADER", "depth_error", "host_errors", "shape_errors"]

MAX_DEPTH: Final = 64
MIN_HEADER: Final = 256
_NAMED_LEVELS: Final = 3
_TOKEN: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE: Final = re.compile(r"[\r\n\0]")


def depth_error(raw: Any) -> str | None:
    """The first TOML path nested deeper than `MAX_DEPTH` tables or arrays, as an error; else None."""
    todo: list[tuple[Any, str, int]] = [(raw, "$", 0)]
    while todo:
        value, path, depth = todo.pop()
        if depth > MAX_DEPTH:
            return f"{path}: nested more than {MAX_DEPTH} levels deep"
        named = depth < _NAMED_LEVELS  # the path names the setting, not every level below it
        if isinstance(value, dict):
            todo.extend((item, f"{path}.{key}" if named else path, depth + 1) for key, item in value.items())
        elif isinstance(value, list):
            todo.extend(
                (item, f"{path}[{index}]" if named else path, depth + 1) for index, item in enumerate(value)
            )
    return None


def shape_errors(config: Any) -> Iterator[str]:
    """Non-finite numbers, bad header names and values, unusable listener limits; see the module doc."""
    yield from _walk(config, "$")
    listener = config.listener
    for name in listener.__struct_fields__:
        if name.endswith("_timeout") and getattr(listener, name) <= 0:
            yield f"$.listener.{name}: must be more than 0s (0s would drop every connection at once)"
    if listener.max_header < MIN_HEADER:
        yield f"$.listener.max_header: must be at least {MIN_HEADER} bytes (no request head fits in less)"


def host_errors(config: Any) -> Iterator[str]:
    """What this machine lacks for the config: an unknown control group, a file sink path that is a folder."""
    group = config.control.group
    if group is not None and not group.isdigit():
        try:
            grp.getgrnam(group)
        except KeyError:
            yield f"$.control.group: no such group {group!r} on this machine"
    for name, sink in config.sinks.items():
        path = getattr(sink, "path", None)
        if sink.__struct_config__.tag == "file" and isinstance(path, str) and os.path.isdir(path):
            yield f"$.sinks.{name}.path: {path} is a folder; give the file to append to"


def _walk(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, float):
        if not math.isfinite(value):
            yield f"{path}: must be a finite number, got {value}"
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            item = getattr(value, name)
            where = f"{path}.{name}"
            if name == "headers" and isinstance(item, dict):
                yield from _headers(item, where)
            elif name.endswith("header") and isinstance(item, str) and not _TOKEN.match(item):
                yield f"{where}: {item!r} is not a valid header name"
            else:
                yield from _walk(item, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")


def _headers(headers: dict[str, Any], path: str) -> Iterator[str]:
    for name, value in headers.items():
        if not _TOKEN.match(name):
            yield f"{path}: {name!r} is not a valid header name"
        text = value.value.reveal() if isinstance(value, SecretRef) and value.bound else value
        if isinstance(text, str) and _BAD_VALUE.search(text):
            shown = "its value" if isinstance(value, SecretRef) else repr(text)
            yield f"{path}.{name}: {shown} holds a CR, LF or NUL (header values are one line)"
