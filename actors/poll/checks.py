"""Conditional requests for every page of a listing (docs/polling.md, "Conditional requests").

Pure: no I/O. The poller holds its source's `PageCheck`s in a `Checks` (loaded with its state);
the store writes each page's check with the page's items (`daemon.store.poll.commit_pages`), so
a stored validator always stands for items already stored and for the next URL they led to.

What a page's request carries:
    The `ETag` (as `If-None-Match`, weak or strong, verbatim) or else the `Last-Modified` (as
    `If-Modified-Since`) that the page at the same position, fetched from the same URL, was last
    answered with in full — only while that answer is younger than `horizon` (half the
    `[store] dedup_window`: a 304 refreshes no key, so a page must be read in full again before
    the keys of its items could be forgotten), and, with `link` paging, not for the page that
    ended the listing (its `rel="next"` may appear without its body, hence a body-only ETag,
    changing), unless `newest_first`. A `Last-Modified` is kept only without an `ETag`, and
    when the answer's `Date` is at least a second later (RFC 9110 8.8.2.2: otherwise a change
    in the same second would not move it). No validator is ever sent without the next URL it
    led to.

What a 304 means:
    The page's body is the one read in full before: its items are stored, its next page is the
    stored `next_url`, its highest mark the stored `mark`. A 304 to a request that carried no
    validator is the upstream's error (`http_304`), never taken as "nothing new".

When an unchanged first page ends the cycle:
    Only with `newest_first` (the API lists whatever is new to ferry first, so any change to
    the listing changes its first page), for the first page of the last *complete* listing
    (same URL and validators), and while every page of that listing was read in full within
    `horizon`.
"""

from __future__ import annotations

import email.utils
from typing import Final, final

from daemon.errors import PollError
from daemon.http.client import Response
from daemon.store.poll import PageCheck, PollState

__all__ = ["CHECKED_PAGES", "Checks", "trusted_last_modified"]

CHECKED_PAGES: Final = 1000
"""Most pages of a listing whose validators are kept (the first ones); later pages are always read."""


def trusted_last_modified(response: Response) -> str | None:
    """The answer's `Last-Modified` if it is at least one second older than its `Date`, else None."""
    modified, date = response.header("last-modified"), response.header("date")
    if not modified or not date:
        return None
    try:
        gap = email.utils.parsedate_to_datetime(date) - email.utils.parsedate_to_datetime(modified)
    except (TypeError, ValueError):
        return None
    return modified if gap.total_seconds() >= 1 else None


@final
class Checks:
    """One poll source's page checks, and the rules above for using them."""

    def __init__(
        self,
        checks: dict[int, PageCheck],
        *,
        enabled: bool,
        horizon: float,
        link: bool,
        newest_first: bool,
    ) -> None:
        self._checks = checks
        self._enabled = enabled
        self._horizon = horizon
        self._link = link
        self._newest_first = newest_first

    def __repr__(self) -> str:
        return f"<Checks [{len(self._checks)} pages, horizon: {self._horizon:g}s]>"

    def get(self, position: int) -> PageCheck | None:
        return self._checks.get(position)

    def headers(self, position: int, url: str, now: float) -> tuple[list[tuple[str, str]], PageCheck | None]:
        """The validator headers for the page at `position` fetched from `url`, and the check they
        come from (None: the request goes out unconditional)."""
        check = self._checks.get(position)
        if not self._enabled or check is None or check.url != url:
            return [], None
        if now - check.refreshed_at >= self._horizon:
            return [], None
        if self._link and check.next_url is None and not self._newest_first:
            return [], None
        if check.etag:
            return [("if-none-match", check.etag)], check
        if check.last_modified:
            return [("if-modified-since", check.last_modified)], check
        return [], None

    @staticmethod
    def not_modified(asked: PageCheck | None, where: str) -> PageCheck:
        """The check a 304 confirms; a 304 to an unconditional request raises `PollError` (`http_304`)."""
        if asked is None:
            raise PollError(
                f"{where}: HTTP 304 Not Modified to a request that carried no validator "
                "(ferry knows nothing of this page to reuse); asked again after the backoff",
                kind="http_304",
            )
        return asked

    def read(
        self, position: int, url: str, response: Response, next_url: str | None, mark: str | None, now: float
    ) -> PageCheck | None:
        """Note a page read in full; the check to store with it (None: none kept for this page)."""
        if not self._enabled or position > CHECKED_PAGES:
            return None
        etag = response.header("etag")  # preferred: a `Last-Modified` is kept only without one
        modified = None if etag else trusted_last_modified(response)
        check = PageCheck(position, url, etag, modified, next_url, mark, now)
        self._checks[position] = check
        return check

    def may_stop(self, check: PageCheck, state: PollState, now: float) -> bool:
        """Whether a 304 for `check` (a first page) ends the cycle: see the module docstring."""
        return (
            self._newest_first
            and check.position == 1
            and check.url == state.validated_url
            and (check.etag, check.last_modified) == (state.etag, state.last_modified)
            and state.refreshed is not None
            and now - state.refreshed < self._horizon
        )
