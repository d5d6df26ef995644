"""`[sources.NAME] type = "poll"`: a REST API polled into a stream of events (docs/polling.md).

Defined here on `config_base` and assembled into `daemon.config.root.SourceConfig`; `poll_errors`
holds the cross-field checks (jq programs compile, job mode excludes paging) that
`daemon.config` runs with the others.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Annotated, Literal

import jq
from msgspec import Meta

from daemon.config.auth import AuthConfig, TlsConfig, auth_errors
from daemon.config.base import Section, default
from daemon.config.units import Duration, Size

URL = Annotated[str, Meta(pattern=r"^https?://")]


class LinkPaging(Section, frozen=True, tag="link", tag_field="style"):
    """Follow the `Link: <…>; rel="next"` response header (RFC 8288) until there is none."""


class CursorPaging(Section, frozen=True, tag="cursor", tag_field="style"):
    """Send the cursor found in each page in a query parameter; stop when it is null or empty."""

    path: Annotated[str, Meta(description="jq giving the next cursor from a page, e.g. `.next_cursor`.")]
    param: Annotated[str, Meta(min_length=1, description="Query parameter the cursor is sent in.")] = "cursor"


class PagePaging(Section, frozen=True, tag="page", tag_field="style"):
    """Number the pages in a query parameter; stop at a page shorter than `size`."""

    param: Annotated[str, Meta(min_length=1, description="Query parameter of the page number.")] = "page"
    size_param: Annotated[
        str | None, Meta(description="Query parameter of the page size; unset: not sent.")
    ] = "per_page"
    size: Annotated[int, Meta(ge=1, le=100_000, description="Items per full page.")] = 100
    start: Annotated[int, Meta(ge=0, description="Number of the first page.")] = 1


class OffsetPaging(Section, frozen=True, tag="offset", tag_field="style"):
    """Send the number of items already read in a query parameter; stop at a page shorter than `size`."""

    param: Annotated[str, Meta(min_length=1, description="Query parameter of the offset.")] = "offset"
    size_param: Annotated[
        str | None, Meta(description="Query parameter of the page size; unset: not sent.")
    ] = "limit"
    size: Annotated[int, Meta(ge=1, le=100_000, description="Items per full page.")] = 100


Paging = LinkPaging | CursorPaging | PagePaging | OffsetPaging


class SinceConfig(Section, frozen=True):
    """The high-water mark: ask only for what changed since the newest item already stored."""

    field: Annotated[str, Meta(description="jq giving an item's timestamp, e.g. `.updated_at`.")]
    param: Annotated[
        str, Meta(min_length=1, description="Query parameter the mark (minus `overlap`) is sent in.")
    ]
    overlap: Annotated[
        Duration,
        Meta(
            description="Ask again for this much before the mark: items that appear late with an older "
            "timestamp are still caught; the repeats are dropped by `key`."
        ),
    ] = default(Duration(0))
    format: Annotated[
        Literal["rfc3339", "unix", "unix_ms"],
        Meta(description="What the field holds: RFC 3339 text, Unix seconds or Unix milliseconds."),
    ] = "rfc3339"
    initial: Annotated[
        str | None,
        Meta(description="Mark to start from when none is stored; unset: the first cycle sends no `param`."),
    ] = None


class JobConfig(Section, frozen=True):
    """Job mode: each cycle submits the request, then polls a status URL until the job is done."""

    until: Annotated[
        str,
        Meta(
            description='jq predicate on a status answer: true once the job is done, e.g. `.state == "done"`.'
        ),
    ]
    status_url: Annotated[
        str | None,
        Meta(
            description="jq giving the status URL from the submit answer (relative URLs resolve "
            'against `url`), e.g. `.status_url` or `"/jobs/\\(.id)"`; unset: the `Location` header.'
        ),
    ] = None
    fail: Annotated[
        str | None,
        Meta(description="jq predicate on a status answer: true when the job has failed (counted error)."),
    ] = None
    interval: Annotated[Duration, Meta(description="Time between two status requests.")] = default(
        Duration(2)
    )
    timeout: Annotated[
        Duration,
        Meta(
            description="Longest a job may take from its submission; past it: a counted `job_timeout` error."
        ),
    ] = default(Duration(600))


class PollSourceConfig(Section, frozen=True, tag="poll", tag_field="type"):
    """Polls an HTTP API every `interval` and stores each new item as an event (docs/polling.md)."""

    url: Annotated[URL, Meta(description="First page's URL (http or https), query included.")]
    key: Annotated[
        str,
        Meta(
            description="jq giving an item's identity, e.g. `.id`; an item whose key was stored before "
            "(within `[store] dedup_window` of last seeing it) is dropped. Include a version "
            '(`"\\(.id)@\\(.updated_at)"`) to receive every change of an item.'
        ),
    ]
    items: Annotated[str, Meta(description="jq giving the array of items in a response, e.g. `.data`.")] = "."
    method: Annotated[Literal["GET", "POST"], Meta(description="HTTP method.")] = "GET"
    body: Annotated[str | None, Meta(description='JSON request body (with `method = "POST"`).')] = None
    headers: Annotated[dict[str, str], Meta(description="Extra request headers.")] = {}
    interval: Annotated[Duration, Meta(description="Time between the end of one cycle and the next.")] = (
        default(Duration(60))
    )
    jitter: Annotated[
        float,
        Meta(ge=0, le=1, description="Each wait is `interval` plus up to this share of it, at random."),
    ] = 0.1
    timeout: Annotated[Duration, Meta(description="Whole-request timeout of each page.")] = default(
        Duration(30)
    )
    pagination: Annotated[
        Paging | None,
        Meta(
            description='`{ style = "link" | "cursor" | "page" | "offset", … }` (tables below); '
            "unset: one page per cycle."
        ),
    ] = None
    max_pages: Annotated[
        int,
        Meta(
            ge=1,
            description="Most pages fetched in one cycle; the rest of the listing is fetched in the next "
            "cycle, from where this one stopped.",
        ),
    ] = 1000
    conditional: Annotated[
        bool,
        Meta(
            description="Send each page's request with the `If-None-Match` / `If-Modified-Since` of that "
            "page's last answer; a 304 reuses the stored next page and items (docs/polling.md)."
        ),
    ] = True
    newest_first: Annotated[
        bool,
        Meta(
            description="The API lists first whatever is new to ferry (sorted newest first by the time "
            "that makes a `key` new: created for an id, updated for a versioned key), so any change "
            "changes the first page: a 304 for the first page then ends the cycle."
        ),
    ] = False
    since: Annotated[SinceConfig | None, Meta(description="High-water mark (table below).")] = None
    job: Annotated[JobConfig | None, Meta(description="Job mode (table below).")] = None
    max_response: Annotated[Size, Meta(description="Largest response body accepted.")] = default(
        Size(16 * 1024**2)
    )
    initial_backoff: Annotated[Duration, Meta(description="Wait after the first failed cycle; doubles.")] = (
        default(Duration(1))
    )
    max_backoff: Annotated[
        Duration, Meta(description="Longest wait between failed cycles; they go on at this pace.")
    ] = default(Duration(300))
    client: Annotated[
        Literal["lean", "httpx"],
        Meta(
            description="`lean`: ferry's own HTTP/1.1 client. "
            "`httpx`: proxies and CA bundles from the environment."
        ),
    ] = "lean"
    rate_limit: Annotated[
        str | None, Meta(description="Name of a `[rate_limits.NAME]` budget every request takes a permit of.")
    ] = None
    auth: Annotated[
        AuthConfig | None, Meta(description="Authentication of each request (docs/security.md).")
    ] = None
    tls: Annotated[
        TlsConfig | None, Meta(description="Custom CA bundle and/or client certificate (mTLS) for https.")
    ] = None


def poll_errors(name: str, source: PollSourceConfig) -> Iterator[str]:
    """Cross-field problems of one poll source, each with its TOML path."""
    where = f"$.sources.{name}"
    programs: dict[str, str | None] = {"items": source.items, "key": source.key}
    if isinstance(source.pagination, CursorPaging):
        programs["pagination.path"] = source.pagination.path
    if source.since is not None:
        programs["since.field"] = source.since.field
    if source.job is not None:
        programs |= {"job.status_url": source.job.status_url, "job.until": source.job.until}
        programs["job.fail"] = source.job.fail
    for key, program in programs.items():
        if program is not None:
            try:
                jq.compile(program)
            except ValueError as exc:
                message = " ".join(str(exc).replace("jq: error: ", "").split())
                yield f"{where}.{key}: invalid jq program: {message}"
    if source.body is not None:
        try:
            json.loads(source.body)
        except ValueError as exc:
            yield f"{where}.body: not JSON: {exc}"
        if source.method == "GET":
            yield f'{where}.body: a body needs method = "POST"'
    if source.job is not None:
        if source.pagination is not None:
            yield f"{where}.pagination: not with `job` (a job's result is one answer)"
        if source.since is not None:
            yield f"{where}.since: not with `job`"
    yield from auth_errors(source.auth, source.tls, where)
    if source.initial_backoff > source.max_backoff:
        yield f"{where}.initial_backoff: larger than max_backoff"
    if source.since is not None and source.since.initial is not None:
        from actors.poll.watermark import Watermark

        if Watermark.parse(source.since.initial, source.since.format) is None:
            yield f"{where}.since.initial: not a {source.since.format} value"


def poll_tables() -> Mapping[str, type[Section]]:
    """Title → struct of every poll table, for the generated config reference."""
    return {
        '[sources.NAME] type = "poll"': PollSourceConfig,
        'pagination = { style = "link" } (in a poll source)': LinkPaging,
        'pagination = { style = "cursor", … }': CursorPaging,
        'pagination = { style = "page", … }': PagePaging,
        'pagination = { style = "offset", … }': OffsetPaging,
        "since = { … } (in a poll source)": SinceConfig,
        "job = { … } (in a poll source)": JobConfig,
    }
