"""Config tables for keeping other systems in sync: a sink's per-key `ordering` and a transform's
`enrich` lookup (docs/enrichment-and-ordering.md).

`check_ordering` and `check_enrich` are the part of `ferry check` that needs more than types:
jq programs that compile, URL templates whose placeholders are jq, rate limits that exist.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from typing import Annotated, Literal

import jq
from msgspec import Meta

from daemon.config.auth import AuthConfig, auth_errors
from daemon.config.base import Section, default
from daemon.config.units import Duration

PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
"""A `{jq}` placeholder in an enrichment URL."""


class OrderingConfig(Section, frozen=True):
    """Per-key ordering and conflict resolution: a newer version of a record is never overwritten.

    Deliveries with the same `key` leave one at a time, lowest `version` first; a key whose
    delivery is failing holds back only its own later deliveries. A delivery whose version is
    lower than the last one delivered for its key is dropped as `stale` (counted, never sent).
    """

    key: Annotated[
        str,
        Meta(min_length=1, description="jq expression giving a delivery's record key (e.g. `.email`)."),
    ]
    version: Annotated[
        str,
        Meta(
            min_length=1,
            description="jq expression giving the record's version (e.g. `.updated_at`); compared per key.",
        ),
    ]
    compare: Annotated[
        Literal["number", "rfc3339", "string"],
        Meta(
            description="How versions compare: `number` (JSON number or numeric string), `rfc3339` "
            "(timestamps with a zone, compared as instants to the microsecond), `string` (code points)."
        ),
    ] = "number"
    coalesce: Annotated[
        bool,
        Meta(
            description="Send only the newest pending version of a key: older ones not yet sent end "
            "`stale` (superseded) instead of going out first. Saves requests (and quota) when a record "
            "changes faster than it is delivered; if that newest one is then dead-lettered, the "
            "destination keeps the version it had."
        ),
    ] = False


class LookupRetryConfig(Section, frozen=True):
    """How a failing lookup is retried before its event is dead-lettered."""

    max_attempts: Annotated[
        int, Meta(ge=1, le=100, description="Attempts before the event is dead-lettered.")
    ] = 5
    initial_backoff: Annotated[Duration, Meta(description="Backoff ceiling after the first failure.")] = (
        default(Duration(0.2))
    )
    max_backoff: Annotated[Duration, Meta(description="Largest backoff ceiling (full jitter below it).")] = (
        default(Duration(10))
    )


class EnrichConfig(Section, frozen=True):
    """An HTTP lookup per event whose JSON answer is merged into the event by jq, before everything else."""

    url: Annotated[
        str,
        Meta(
            pattern=r"^https?://",
            description="URL to GET; each `{jq}` placeholder is replaced by that expression's value on "
            "the event, percent-encoded (e.g. `https://api.example.com/accounts/{.account_id}`).",
        ),
    ]
    merge: Annotated[
        str,
        Meta(
            min_length=1,
            description="jq program run on the event with the answer bound to `$lookup` (null after a "
            "404 or 410); its one output replaces the event (e.g. `. + {account: $lookup.name}`).",
        ),
    ]
    when: Annotated[
        str | None,
        Meta(description="jq predicate; events for which it is false or null skip the lookup unchanged."),
    ] = None
    headers: Annotated[dict[str, str], Meta(description="Extra request headers.")] = {}
    timeout: Annotated[Duration, Meta(description="Whole-request timeout of one lookup.")] = default(
        Duration(5)
    )
    concurrency: Annotated[int, Meta(ge=1, le=256, description="Lookups in flight at once.")] = 8
    cache_ttl: Annotated[
        Duration, Meta(description="How long an answer is reused for the same URL; `0s`: no cache.")
    ] = default(Duration(60))
    negative_ttl: Annotated[
        Duration, Meta(description="How long a 404/410 (`$lookup` = null) is reused for the same URL.")
    ] = default(Duration(30))
    cache_size: Annotated[
        int, Meta(ge=1, le=10_000_000, description="Most answers kept (the least recently used go first).")
    ] = 10_000
    retry: LookupRetryConfig = default(LookupRetryConfig())
    rate_limit: Annotated[
        str | None, Meta(description="`[rate_limits.NAME]` budget each lookup takes a permit from.")
    ] = None
    auth: Annotated[
        AuthConfig | None, Meta(description="Authentication of each lookup (docs/security.md).")
    ] = None


def check_ordering(where: str, ordering: OrderingConfig) -> Iterator[str]:
    """Errors in a sink's `ordering`: its jq expressions must compile."""
    for key in ("key", "version"):
        yield from _jq_error(f"{where}.ordering.{key}", getattr(ordering, key))


def check_enrich(where: str, enrich: EnrichConfig, rate_limits: Collection[str]) -> Iterator[str]:
    """Errors in a transform's `enrich`: jq programs, URL placeholders, backoff, rate limit, auth."""
    yield from _jq_error(f"{where}.enrich.merge", merge_program(enrich.merge), enrich.merge)
    if enrich.when is not None:
        yield from _jq_error(f"{where}.enrich.when", enrich.when)
    for match in PLACEHOLDER.finditer(enrich.url):
        yield from _jq_error(f"{where}.enrich.url", match.group(1))
    if enrich.retry.initial_backoff > enrich.retry.max_backoff:
        yield f"{where}.enrich.retry.initial_backoff: larger than max_backoff"
    if enrich.rate_limit is not None and enrich.rate_limit not in rate_limits:
        known = ", ".join(sorted(rate_limits)) or "none configured"
        yield f"{where}.enrich.rate_limit: unknown rate limit {enrich.rate_limit!r} (known: {known})"
    yield from auth_errors(enrich.auth, None, f"{where}.enrich")


def merge_program(merge: str) -> str:
    """The jq program that runs `merge` on `{"event": …, "lookup": …}` with `$lookup` bound."""
    return f".lookup as $lookup | .event | ({merge})"


def _jq_error(where: str, program: str, shown: str | None = None) -> Iterator[str]:
    try:
        jq.compile(program)
    except ValueError as exc:
        yield f"{where}: invalid jq program {shown or program!r}: {exc}"
