"""Credentials written into a URL (`http://user:pass@host/…`): found, warned about, never shown.

A URL's user information is a secret like any other: `ferry check` and `ferry run` warn about
every configured URL that carries one (credentials belong in `auth = { type = "basic", … }` with
a secret reference), and the redactor gets the user information and the password
(`url_secrets`), so they are scrubbed from `ferry ctl` answers (status, dead letters, events,
tap), log lines and errors. Spans carry the URL with its user information replaced
(`redact_url`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import msgspec

__all__ = ["credential_paths", "redact_url", "url_secrets"]

MASKED: Final = "***"
_WITH_USERINFO: Final = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)([^/?#]*)@")


def _userinfo(url: str) -> str | None:
    match = _WITH_USERINFO.match(url)
    return match.group(2) if match and match.group(2) else None


def url_secrets(url: str) -> list[str]:
    """The user information of `url`, its password (as written and percent-decoded) and the Basic
    credential the HTTP client sends for them (`base64(user:password)`), if any."""
    userinfo = _userinfo(url)
    if userinfo is None:
        return []
    found = [userinfo]
    try:
        parts = urlsplit(url)
        username, password = parts.username, parts.password
    except ValueError:
        return found
    if password:
        found.extend({password, unquote(password)})
    if username is not None:
        pair = f"{unquote(username)}:{unquote(password or '')}"
        found.append(base64.b64encode(pair.encode()).decode())
    return found


def redact_url(url: str) -> str:
    """`url` with its user information (if any) replaced by `***`."""
    return _WITH_USERINFO.sub(lambda match: f"{match.group(1)}{MASKED}@", url, count=1)


def credential_paths(config: Any) -> Iterator[tuple[str, str]]:
    """(TOML path, URL) of every configured string that is a URL with user information."""
    todo: list[tuple[Any, str]] = [(config, "$")]
    while todo:
        value, path = todo.pop()
        if isinstance(value, str):
            if _userinfo(value) is not None:
                yield path, value
        elif isinstance(value, msgspec.Struct):
            todo.extend(
                (getattr(value, name), f"{path}.{name}") for name in reversed(value.__struct_fields__)
            )
        elif isinstance(value, dict):
            todo.extend((item, f"{path}.{key}") for key, item in reversed(value.items()))
        elif isinstance(value, list | tuple):
            todo.extend((item, f"{path}[{index}]") for index, item in reversed(list(enumerate(value))))


def config_url_secrets(config: Any) -> list[str]:
    """Every secret held in a configured URL (for the redactor)."""
    return [secret for _, url in credential_paths(config) for secret in url_secrets(url)]
