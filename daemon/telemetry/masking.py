"""Masking: what `[telemetry] mask` hides wherever payloads leave the store.

Rules:
    A bare name (`"email"`) masks that key at any depth, in any object, whatever its case
    (`Email`, `EMAIL`). A path (`"$.card.number"`) masks one place: the keys from the root,
    exactly as spelled; a list met along a path is walked element by element, so
    `$.cards.number` masks `number` in every element of `cards`. The masked value, whatever
    it was (a string, a number, an object), becomes `"***"`.

Where:
    `ferry ctl dlq show` and `ferry ctl tap` payloads, the fields of every JSON log line, the
    audit trail's arguments. Spans carry no payloads. Free text that may quote a payload (a
    receiver's error body, a jq error) has the masked values of that payload, and every
    configured secret, replaced by `"***"` (`Redactor.scrub`).

Secrets:
    Header values are never shown: `authorization`, `proxy-authorization`, `cookie`,
    `x-api-key` and every header a sink's config sets (`redact_headers`). Scrubbed from log
    lines and control answers (`Redactor.secrets`): every secret reference's value, the value of
    each secret header a sink's config sets (`secret_header`: the names above and any name with
    auth, token, secret, key, password, session, signature or credential in it; not `Accept`
    or `X-Source`), and credentials written into a URL (`daemon.config.url_credentials`). A value
    shorter than `SHORT` characters is scrubbed only as a whole word.

Cost:
    Rules are compiled once (`compile_rules`); with no rules `mask` returns its argument
    unchanged and nothing is copied.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final, final

import msgspec

from daemon.config.url_credentials import config_url_secrets

MASKED: Final = "***"
SECRET_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
RULE_PATTERN: Final = r"^(\$(\.[^.\s]+)+|[^$.\s][^.\s]*)$"
_RULE = re.compile(RULE_PATTERN)

# A path tree: key -> subtree; a subtree of None means "mask here".
_Tree = dict[str, "_Tree | None"]


@dataclass(frozen=True)
class Rules:
    """Compiled masking rules: bare names (lower-cased) and a tree of root paths."""

    names: frozenset[str] = frozenset()
    paths: _Tree = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.names or self.paths)


NO_RULES: Final = Rules()


def compile_rules(rules: Iterable[str]) -> Rules:
    """Compile `[telemetry] mask` entries; raises `ValueError` naming an invalid one."""
    names: set[str] = set()
    paths: _Tree = {}
    for rule in rules:
        if not _RULE.match(rule):
            raise ValueError(f"invalid mask rule {rule!r}: expected a key name or a path like $.a.b")
        if not rule.startswith("$"):
            names.add(rule.lower())
            continue
        node = paths
        keys = rule[2:].split(".")
        for key in keys[:-1]:
            child = node.get(key, {})
            if child is None:  # a shorter path already masks the whole subtree
                break
            node[key] = child
            node = child
        else:
            node[keys[-1]] = None
    return Rules(frozenset(names), paths)


def mask(value: Any, rules: Rules) -> Any:
    """`value` with every place `rules` names replaced by `"***"`; `value` itself is not changed.

    A value nested too deep to walk (`RecursionError`) is hidden whole: masking fails closed.
    """
    if not rules:
        return value
    try:
        return _mask(value, rules.names, rules.paths)
    except RecursionError:
        return MASKED


def _mask(value: Any, names: frozenset[str], tree: _Tree | None) -> Any:
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if isinstance(key, str) and key.lower() in names:
                out[key] = MASKED
                continue
            subtree = tree.get(key, {}) if tree and isinstance(key, str) else {}
            out[key] = MASKED if subtree is None else _mask(item, names, subtree or None)
        return out
    if isinstance(value, list | tuple):
        return [_mask(item, names, tree) for item in value]
    return value


def masked_values(value: Any, rules: Rules) -> list[str]:
    """The scalar values (as text) that `mask` would hide in `value`, longest first."""
    found: set[str] = set()
    if rules:
        _collect(value, rules.names, rules.paths, found, hidden=False)
    return sorted((text for text in found if text), key=lambda text: (-len(text), text))


def _collect(value: Any, names: frozenset[str], tree: _Tree | None, found: set[str], *, hidden: bool) -> None:
    # A loop over an explicit stack, not recursion: a payload nested deeper than Python's
    # recursion limit must not make a sink or a log line raise (docs/reliability.md, "Poison events").
    stack: list[tuple[Any, _Tree | None, bool]] = [(value, tree, hidden)]
    while stack:
        value, tree, hidden = stack.pop()
        if isinstance(value, Mapping):
            for key, item in value.items():
                subtree = tree.get(key, {}) if tree and isinstance(key, str) else {}
                hide = hidden or subtree is None or (isinstance(key, str) and key.lower() in names)
                stack.append((item, subtree or None, hide))
        elif isinstance(value, list | tuple):
            stack.extend((item, tree, hidden) for item in value)
        elif hidden and value is not None and not isinstance(value, bool):
            found.add(str(value))


def redact_headers(
    headers: Iterable[tuple[str, str]], configured: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """`headers` with the value of every secret header (and of each `configured` name) hidden."""
    hidden = SECRET_HEADERS | {name.lower() for name in configured}
    return [(name, MASKED if name.lower() in hidden else value) for name, value in headers]


@dataclass(frozen=True)
class Redactor:
    """Masking rules plus the literal secrets (sink header values) never to show."""

    rules: Rules = NO_RULES
    secrets: tuple[str, ...] = ()

    @classmethod
    def build(cls, rules: Iterable[str], secrets: Iterable[str] = ()) -> Redactor:
        unique = {secret for secret in secrets if secret}
        return cls(compile_rules(rules), tuple(sorted(unique, key=len, reverse=True)))

    def mask(self, value: Any) -> Any:
        """`mask(value, rules)`, then secrets scrubbed from its strings."""
        masked = mask(value, self.rules)
        try:
            return _scrub_strings(masked, self.secrets) if self.secrets else masked
        except RecursionError:  # too deep to walk: hidden whole, as `mask` does
            return MASKED

    def scrub(self, text: str | None, payload: Any = None) -> str | None:
        """`text` with the masked values of `payload` and every secret replaced by `"***"`.

        A value shorter than `SHORT` is replaced only where it stands as a word of its own, never
        inside a longer word (a masked `"v"` leaves "delivery" alone).
        """
        if not text:
            return text
        masked = masked_values(payload, self.rules)
        if masked:  # a payload's values: compiled for this text only, not cached
            return _compile((*masked, *self.secrets)).sub(MASKED, text)
        return _pattern(self.secrets).sub(MASKED, text) if self.secrets else text


SHORT: Final = 8
"""Secrets and masked values shorter than this are scrubbed only as whole words."""


def _compile(values: tuple[str, ...]) -> re.Pattern[str]:
    """One regex replacing every value, longest first; a short one only outside a word."""
    ordered = sorted({value for value in values if value}, key=lambda value: (-len(value), value))
    return re.compile(
        "|".join(
            re.escape(value) if len(value) >= SHORT else rf"(?<!\w){re.escape(value)}(?!\w)"
            for value in ordered
        )
    )


_pattern = lru_cache(maxsize=16)(_compile)  # the configured secrets: the same few tuples


def _scrub_strings(value: Any, secrets: Sequence[str]) -> Any:
    if isinstance(value, str):
        return _pattern(tuple(secrets)).sub(MASKED, value)
    if isinstance(value, Mapping):
        return {key: _scrub_strings(item, secrets) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_strings(item, secrets) for item in value]
    return value


def decode_payload(payload: bytes | str | None) -> Any:
    """A stored payload as JSON values, or its text when it is not JSON."""
    if payload is None:
        return None
    try:
        return msgspec.json.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return payload if isinstance(payload, str) else payload.decode("utf-8", "replace")


_SECRET_NAME: Final = re.compile(r"auth|token|secret|key|password|passwd|session|signature|credential", re.I)


def secret_header(name: str) -> bool:
    """Whether a header's value is a secret: `SECRET_HEADERS`, or a name that says so (`X-Auth-Token`)."""
    return name.lower() in SECRET_HEADERS or _SECRET_NAME.search(name) is not None


def sink_secrets(sinks: Mapping[str, Any]) -> list[str]:
    """The values of the secret headers (`secret_header`) every sink's config sets; other header
    values (`Accept`, `X-Source`) are not secrets."""
    return [
        value
        for sink in sinks.values()
        for name, value in getattr(sink, "headers", {}).items()
        if secret_header(name)
    ]


def config_redactor(config: Any, keep: Redactor | None = None) -> Redactor:
    """The redactor a config asks for: its `[telemetry] mask`, every sink header value and every
    secret it references (`daemon.config.secrets`); with `keep`, that redactor's secrets as well, so a
    secret rotated out by a reload stays hidden for the life of the process."""
    from daemon.config import secrets

    values = [
        *sink_secrets(config.sinks),
        *config_url_secrets(config),
        *secrets.values(config),
        *(keep.secrets if keep else ()),
    ]
    return Redactor.build(config.telemetry.mask, values)


@final
@dataclass
class Masking:
    """One daemon's redactor, handed to its actors at construction and swapped whole by a reload
    (so the holders read `redactor` at each use, never keep it). The default masks nothing."""

    redactor: Redactor = field(default_factory=Redactor)
