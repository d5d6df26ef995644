"""The pure rules of per-page conditional requests (actors/poll/checks.py), table-driven."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.poll.checks import CHECKED_PAGES, Checks, trusted_last_modified
from daemon.errors import PollError
from daemon.http.client import Response
from daemon.store.poll import PageCheck, PollState, commit_pages, load_checks, load_state
from daemon.store.sqlite import open_connection

URL = "https://api.example.com/items?cursor=abc"
NOW = 1_000_000.0


def check(**fields: object) -> PageCheck:
    values: dict[str, object] = {
        "position": 2,
        "url": URL,
        "etag": 'W/"e1"',
        "last_modified": "Mon, 05 Jan 2026 10:00:00 GMT",
        "next_url": URL + "d",
        "mark": None,
        "refreshed_at": NOW - 10,
    }
    return PageCheck(**(values | fields))  # type: ignore[arg-type]


def checks(
    stored: PageCheck, *, link: bool = False, newest_first: bool = False, enabled: bool = True
) -> Checks:
    return Checks(
        {stored.position: stored}, enabled=enabled, horizon=60, link=link, newest_first=newest_first
    )


@pytest.mark.parametrize(
    ("stored", "options", "url", "expected"),
    [
        (check(), {}, URL, [("if-none-match", 'W/"e1"')]),  # weak ETags go back verbatim
        (check(etag=None), {}, URL, [("if-modified-since", "Mon, 05 Jan 2026 10:00:00 GMT")]),
        (check(etag=None, last_modified=None), {}, URL, []),
        (check(), {}, URL + "x", []),  # another URL at this position: nothing known of it
        (check(refreshed_at=NOW - 60), {}, URL, []),  # past the horizon: read in full
        (check(), {"enabled": False}, URL, []),
        (check(next_url=None), {"link": True}, URL, []),  # link paging: the last page in full
        (check(next_url=None), {"link": True, "newest_first": True}, URL, [("if-none-match", 'W/"e1"')]),
        (check(next_url=None), {}, URL, [("if-none-match", 'W/"e1"')]),  # cursor: the end is in the body
    ],
)
def test_which_validators_a_page_request_carries(
    stored: PageCheck, options: dict[str, bool], url: str, expected: list[tuple[str, str]]
) -> None:
    headers, asked = checks(stored, **options).headers(2, url, NOW)
    assert headers == expected
    assert (asked is stored) == bool(expected)


@pytest.mark.parametrize(
    ("modified", "date", "trusted"),
    [
        ("Mon, 05 Jan 2026 10:00:00 GMT", "Mon, 05 Jan 2026 10:00:01 GMT", True),
        ("Mon, 05 Jan 2026 10:00:00 GMT", "Mon, 05 Jan 2026 10:00:00 GMT", False),  # same second
        ("Mon, 05 Jan 2026 10:00:05 GMT", "Mon, 05 Jan 2026 10:00:00 GMT", False),  # in the future
        ("Mon, 05 Jan 2026 10:00:00 GMT", None, False),  # no Date: no way to tell
        ("yesterday", "Mon, 05 Jan 2026 10:00:00 GMT", False),
        (None, "Mon, 05 Jan 2026 10:00:00 GMT", False),
    ],
)
def test_a_last_modified_is_trusted_only_a_second_before_the_date(
    modified: str | None, date: str | None, trusted: bool
) -> None:
    headers = [(name, value) for name, value in (("last-modified", modified), ("date", date)) if value]
    assert trusted_last_modified(Response(200, headers, b"")) == (modified if trusted else None)


def test_a_page_read_is_kept_up_to_the_bound_and_a_stray_304_is_an_error() -> None:
    kept = Checks({}, enabled=True, horizon=60, link=False, newest_first=False)
    answer = Response(200, [("etag", '"a"')], b"[]")
    stored = kept.read(1, URL, answer, None, "2026-01-01T00:00:00Z", NOW)
    assert stored == PageCheck(1, URL, '"a"', None, None, "2026-01-01T00:00:00Z", NOW)
    assert kept.get(1) == stored
    assert kept.read(CHECKED_PAGES + 1, URL, answer, None, None, NOW) is None
    with pytest.raises(PollError, match="carried no validator") as raised:
        Checks.not_modified(None, "GET https://api.example.com/items")
    assert raised.value.kind == "http_304"


@pytest.mark.parametrize(
    ("newest_first", "state", "stops"),
    [
        (True, PollState(etag='W/"e1"', validated_url=URL, refreshed=NOW - 10), True),
        (False, PollState(etag='W/"e1"', validated_url=URL, refreshed=NOW - 10), False),
        (
            True,
            PollState(etag='W/"e0"', validated_url=URL, refreshed=NOW - 10),
            False,
        ),  # not the last listing's
        (True, PollState(etag='W/"e1"', validated_url=URL + "x", refreshed=NOW - 10), False),
        (
            True,
            PollState(etag='W/"e1"', validated_url=URL, refreshed=NOW - 60),
            False,
        ),  # keys may be forgotten
        (True, PollState(etag='W/"e1"', validated_url=URL, refreshed=None), False),
    ],
)
def test_an_unchanged_first_page_ends_the_cycle_only_when_safe(
    newest_first: bool, state: PollState, stops: bool
) -> None:
    first = check(position=1, last_modified=None)
    assert checks(first, newest_first=newest_first).may_stop(first, state, NOW) is stops


def test_checks_are_stored_with_their_pages_one_row_per_position_per_source(tmp_path: Path) -> None:
    conn = open_connection(tmp_path / "ferry.db", "normal")
    first = PageCheck(1, URL, '"a"', None, URL + "2", "2026-01-01T00:00:00Z", NOW)
    second = PageCheck(2, URL + "2", None, "Mon, 05 Jan 2026 10:00:00 GMT", None, None, NOW)
    state = PollState(refreshed=NOW, cycle_refreshed=NOW - 1)
    commit_pages(conn, "api", [(["1"], [b"{}"], state)], [], dedup_window=60, checks=[first, second])
    assert load_checks(conn, "api") == {1: first, 2: second}
    assert load_state(conn, "api") == state
    again = PageCheck(1, URL, '"b"', None, URL + "2", None, NOW + 1)
    commit_pages(conn, "api", [([], [], PollState())], [], dedup_window=60, checks=[again])
    assert load_checks(conn, "api") == {1: again, 2: second}  # replaced at its position
    assert load_checks(conn, "other") == {}
