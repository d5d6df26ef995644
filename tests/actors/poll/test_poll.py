"""The pure parts of polling: Link headers, next pages, the high-water mark, reading a page, storing it."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from actors.poll.config import PollSourceConfig
from actors.poll.pages import Page, PageReader, Watermark, first_url, link_targets, next_url, with_params
from daemon.config.units import dec_hook
from daemon.errors import PollError
from daemon.store.at_rest import PREFIX, Cipher
from daemon.store.poll import PollState, commit_page, commit_pages, load_state
from daemon.store.sqlite import open_connection

BASE = "https://api.example.com/v1/items?limit=100"


def config(**fields: Any) -> PollSourceConfig:
    return msgspec.convert({"url": BASE, "key": ".id"} | fields, PollSourceConfig, dec_hook=dec_hook)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (['<https://a.example/p?page=2>; rel="next"'], {"next": "https://a.example/p?page=2"}),
        (["</items?page=3>; rel=next"], {"next": "https://api.example.com/items?page=3"}),  # token, relative
        (
            ['<https://a/p?page=2>; rel="next", <https://a/p?page=9>; rel="last"'],
            {"next": "https://a/p?page=2", "last": "https://a/p?page=9"},
        ),
        (['<https://a/2>; title="a, b; c"; rel="NEXT"'], {"next": "https://a/2"}),  # quoted , and ; and case
        (['<https://a/2>; rel="next last"'], {"next": "https://a/2", "last": "https://a/2"}),
        (
            ['<https://a/p1>; rel="prev"', '<https://a/p3>; rel="next"'],
            {"prev": "https://a/p1", "next": "https://a/p3"},
        ),
        (['<https://a/2>; rel="next", <https://a/3>; rel="next"'], {"next": "https://a/2"}),  # first wins
        (["<https://a/2>"], {}),  # no rel
        (['<https://a/2>; rel=""'], {}),
        (["garbage; rel=next"], {}),  # no <URI>: skipped, not guessed
        ([""], {}),
        ([], {}),
    ],
)
def test_link_header_parsing(values: list[str], expected: dict[str, str]) -> None:
    assert link_targets(values, "https://api.example.com/v1/items") == expected


def test_with_params_replaces_and_keeps_the_rest() -> None:
    assert with_params(BASE, {"cursor": "a b"}) == "https://api.example.com/v1/items?limit=100&cursor=a+b"
    assert with_params(BASE, {"limit": "5"}) == "https://api.example.com/v1/items?limit=5"


def test_first_url_carries_the_mark_and_the_first_page() -> None:
    since = {"field": ".t", "param": "since"}
    assert first_url(config(since=since), "2026-01-01T00:00:00Z").endswith(
        "limit=100&since=2026-01-01T00%3A00%3A00Z"
    )
    assert first_url(config(since=since), None) == BASE
    paged = config(pagination={"style": "page", "size": 50})
    assert first_url(paged, None) == BASE + "&page=1&per_page=50"
    offset = config(pagination={"style": "offset", "size": 50, "size_param": None})
    assert first_url(offset, None) == BASE + "&offset=0"


def page(count: int, cursor: Any = None) -> Page:
    return Page([b"{}"] * count, [str(n) for n in range(count)], [None] * count, cursor)


@pytest.mark.parametrize(
    ("paging", "url", "read", "links", "expected"),
    [
        (None, BASE, page(100), {}, None),
        ({"style": "link"}, BASE, page(100), {"next": "https://x/2"}, "https://x/2"),
        ({"style": "link"}, BASE, page(100), {"prev": "https://x/0"}, None),
        ({"style": "cursor", "path": ".n"}, BASE, page(100, "abc"), {}, BASE + "&cursor=abc"),
        (
            {"style": "cursor", "path": ".n", "param": "after"},
            BASE + "&after=x",
            page(3, 42),
            {},
            BASE + "&after=42",
        ),
        ({"style": "cursor", "path": ".n"}, BASE, page(100, None), {}, None),
        ({"style": "cursor", "path": ".n"}, BASE, page(100, ""), {}, None),
        ({"style": "cursor", "path": ".n"}, BASE, page(100, False), {}, None),
        ({"style": "page", "size": 100}, BASE + "&page=1", page(100), {}, BASE + "&page=2"),
        ({"style": "page", "size": 100}, BASE + "&page=7", page(99), {}, None),  # short page: the end
        ({"style": "page", "size": 100, "start": 0}, BASE, page(100), {}, BASE + "&page=1"),
        ({"style": "offset", "size": 100}, BASE + "&offset=200", page(100), {}, BASE + "&offset=300"),
        ({"style": "offset", "size": 100}, BASE + "&offset=200", page(0), {}, None),
    ],
)
def test_next_url(
    paging: dict[str, Any] | None, url: str, read: Page, links: dict[str, str], expected: str | None
) -> None:
    paging_config = config(pagination=paging).pagination
    assert next_url(paging_config, url, read, links) == expected


@pytest.mark.parametrize(
    ("value", "form", "order"),
    [
        ("2026-01-01T00:00:10Z", "rfc3339", 1767225610.0),
        ("2026-01-01T01:00:10+01:00", "rfc3339", 1767225610.0),
        ("2026-01-01T00:00:10", "rfc3339", 1767225610.0),  # no zone: UTC
        ("2026-01-01T00:00:10.5Z", "rfc3339", 1767225610.5),
        (1767225610, "unix", 1767225610.0),
        ("1767225610", "unix", 1767225610.0),
        (1767225610500, "unix_ms", 1767225610.5),
        (1767225610, "rfc3339", None),
        ("yesterday", "rfc3339", None),
        ("soon", "unix", None),
        (True, "unix", None),
        (float("nan"), "unix", None),
        ({"t": 1}, "unix", None),
    ],
)
def test_watermark_parse(value: Any, form: str, order: float | None) -> None:
    mark = Watermark.parse(value, form)
    assert (mark.order if mark else None) == order


@pytest.mark.parametrize(
    ("text", "form", "overlap", "sent"),
    [
        ("2026-01-01T00:01:00Z", "rfc3339", 0, "2026-01-01T00:01:00Z"),  # as the API wrote it
        ("2026-01-01T00:01:00Z", "rfc3339", 90, "2025-12-31T23:59:30Z"),
        ("2026-01-01T00:01:00.250Z", "rfc3339", 1, "2026-01-01T00:00:59.250000Z"),
        ("2026-01-01T02:01:00+02:00", "rfc3339", 60, "2026-01-01T02:00:00+02:00"),
        ("2026-01-01T00:01:00", "rfc3339", 60, "2026-01-01T00:00:00"),
        ("1767225660", "unix", 60, "1767225600"),
        ("1767225660000", "unix_ms", 1.5, "1767225658500"),
    ],
)
def test_watermark_minus_overlap_is_written_as_the_api_writes_it(
    text: str, form: str, overlap: float, sent: str
) -> None:
    mark = Watermark.parse(text, form)
    assert mark is not None
    assert mark.minus(overlap, form) == sent


def test_the_highest_mark_skips_items_without_one_and_refuses_a_wrong_one() -> None:
    current = Watermark.parse("2026-01-01T00:00:05Z", "rfc3339")
    marks = ["2026-01-01T00:00:03Z", None, "2026-01-01T00:00:09Z", "2026-01-01T00:00:07Z"]
    best = Watermark.highest(marks, "rfc3339", current)
    assert best is not None
    assert best.text == "2026-01-01T00:00:09Z"
    assert Watermark.highest([None, None], "rfc3339", current) == current
    assert Watermark.highest([], "unix", None) is None
    with pytest.raises(PollError, match=r"item 1: `since.field` gave 12, not a rfc3339 value") as info:
        Watermark.highest(["2026-01-01T00:00:03Z", 12], "rfc3339", current)
    assert info.value.kind == "bad_mark"


def reader(plain: bool) -> PageReader:
    """A reader of `{"data": [...], "next": …}`: plain paths (read with msgspec) or the same through jq."""
    suffix = "" if plain else " | ."
    return PageReader(
        config(
            items=".data" + suffix,
            key=".id" + suffix,
            since={"field": ".t", "param": "s"},
            pagination={"style": "cursor", "path": ".next"},
        )
    )


READERS = pytest.mark.parametrize("plain", [True, False], ids=["paths", "jq"])


@READERS
def test_a_page_is_read_with_its_keys_marks_and_cursor(plain: bool) -> None:
    body = b'{"data": [{"id": 1, "t": "a"}, {"id": "x", "t": null}, {"id": 2.0}], "next": "c2"}'
    read = reader(plain).read(body, "application/json")
    assert read.items[:2] == [b'{"id":1,"t":"a"}', b'{"id":"x","t":null}']
    assert read.keys == ["1", "x", "2"]  # 2.0 and 2 are one key, as jq sees them
    assert read.marks == ["a", None, None]
    assert read.cursor == "c2"


def test_plain_paths_keep_big_integers_exactly() -> None:
    read = reader(True).read(b'{"data": [{"id": 12345678901234567890}]}', None)
    assert read.items == [b'{"id":12345678901234567890}']
    assert read.keys == ["12345678901234567890"]


@READERS
@pytest.mark.parametrize(
    ("body", "kind", "message"),
    [
        (b"<html>oops</html>", "not_json", "response is not JSON (text/html)"),
        (b'{"data": [', "not_json", "response is not JSON (text/html)"),
        (b"\xff\xfe", "not_json", "response is not JSON"),
        (b'{"data": {"id": 1}}', "bad_shape", "`items` must give one array, got object"),
        (b'{"other": 1}', "bad_shape", "`items` must give one array, got null"),
        (b'{"data": [{"id": 1}, {"name": "no id"}]}', "no_key", "item 1 has no key"),
        (b'{"data": [1, 2]}', "jq", "jq failed on the response"),
        (b'[{"id": 1}]', "jq", "jq failed on the response"),
    ],
)
def test_a_bad_page_is_a_specific_error(plain: bool, body: bytes, kind: str, message: str) -> None:
    with pytest.raises(PollError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        reader(plain).read(body, "text/html")
    assert info.value.kind == kind


@READERS
def test_an_empty_page_is_fine(plain: bool) -> None:
    read = reader(plain).read(b'{"data": [], "next": null}', None)
    assert (read.items, read.keys, read.cursor) == ([], [], None)


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    return open_connection(tmp_path / "ferry.db", "normal")


def test_a_page_is_stored_with_its_state_and_repeats_are_dropped_by_key(conn: sqlite3.Connection) -> None:
    state = PollState(mark="m1", next_url="https://x/2", pages=1)
    first = commit_page(conn, "api", ["1", "2", "2"], [b"a", b"b", b"b2"], ["out"], state, dedup_window=60)
    assert [payload for _, payload in first.events] == [b"a", b"b"]
    assert first.duplicates == 1  # twice in one page
    second = commit_page(
        conn, "api", ["2", "3"], [b"b", b"c"], ["out"], PollState(mark="m2"), dedup_window=60
    )
    assert [payload for _, payload in second.events] == [b"c"]
    assert load_state(conn, "api") == PollState(mark="m2")
    deliveries = conn.execute("SELECT count(*) FROM deliveries WHERE stage = 'out'").fetchone()[0]
    assert deliveries == 3
    other = commit_page(conn, "other", ["1"], [b"z"], [], PollState(), dedup_window=60)  # keys are per source
    assert len(other.events) == 1


def test_a_key_is_forgotten_only_dedup_window_after_it_was_last_seen(conn: sqlite3.Connection) -> None:
    commit_page(conn, "api", ["1"], [b"a"], [], PollState(), dedup_window=60)
    conn.execute("UPDATE dedup SET created_at = ?", (time.time() - 50,))
    assert commit_page(conn, "api", ["1"], [b"a"], [], PollState(), dedup_window=60).duplicates == 1
    (seen,) = conn.execute("SELECT created_at FROM dedup").fetchone()
    assert seen > time.time() - 5  # refreshed by the repeat
    conn.execute("UPDATE dedup SET created_at = ?", (time.time() - 61,))
    assert len(commit_page(conn, "api", ["1"], [b"a"], [], PollState(), dedup_window=60).events) == 1


def test_pages_committed_together_store_what_one_commit_per_page_would(tmp_path: Path) -> None:
    pages = [
        (["1", "2", "2"], [b"a", b"b", b"b2"], PollState(next_url="https://x/2", pages=1)),
        (["2", "3"], [b"b", b"c"], PollState(next_url="https://x/3", pages=2)),  # "2" again: a repeat
        (["4", "1"], [b"d", b"a"], PollState(mark="m", pages=0)),
    ]
    one = open_connection(tmp_path / "one.db", "normal")
    one.execute("BEGIN")
    each = [commit_page(one, "api", k, i, ["out"], s, dedup_window=60) for k, i, s in pages]
    one.execute("COMMIT")
    together = open_connection(tmp_path / "together.db", "normal")
    together.execute("BEGIN")
    batch = commit_pages(together, "api", pages, ["out"], dedup_window=60)
    together.execute("COMMIT")
    assert [[p for _, p in c.events] for c in batch] == [[b"a", b"b"], [b"c"], [b"d"]]
    assert [c.duplicates for c in batch] == [1, 1, 1] == [c.duplicates for c in each]
    rows = "SELECT seq, stream, payload FROM events ORDER BY seq"
    assert together.execute(rows).fetchall() == one.execute(rows).fetchall()
    keys = "SELECT key FROM dedup ORDER BY key"
    assert (
        together.execute(keys).fetchall() == one.execute(keys).fetchall() == [("1",), ("2",), ("3",), ("4",)]
    )
    stored_ids = [event_id for c in batch for event_id, _ in c.events]
    assert [r[0] for r in together.execute("SELECT id FROM events ORDER BY seq")] == stored_ids
    assert together.execute("SELECT count(*) FROM deliveries WHERE stage = 'out'").fetchone()[0] == 4
    assert load_state(together, "api") == PollState(mark="m", pages=0)
    assert commit_pages(together, "api", [], ["out"], dedup_window=60) == []


def test_polled_items_are_sealed_when_the_store_is_encrypted(tmp_path: Path) -> None:
    cipher = Cipher(os.urandom(32))
    conn = open_connection(tmp_path / "ferry.db", "normal", cipher=cipher)
    committed = commit_page(conn, "api", ["1"], [b'{"id": 1}'], [], PollState(), dedup_window=60)
    assert [payload for _, payload in committed.events] == [b'{"id": 1}']  # in clear for taps
    (stored,) = conn.execute("SELECT payload FROM events").fetchone()
    assert stored.startswith(PREFIX)
    assert b'{"id"' not in stored  # (a bare b"id" can turn up in the base64 by chance)
    assert cipher.open(stored) == b'{"id": 1}'


def test_a_bad_poll_source_is_refused_with_every_problem_and_its_path() -> None:
    from daemon.config.root import parse
    from daemon.errors import ConfigError

    text = """
[sources.api]
type = "poll"
url = "http://x/items"
key = ".id |"
body = "{"
job = { until = ".done" }
pagination = { style = "link" }
since = { field = ".t", param = "s", initial = "yesterday" }
initial_backoff = "10m"
max_backoff = "1m"
rate_limit = "nope"

[sources.other]
type = "poll"
url = "http://x"
key = ".id"
pagination = { style = "sideways" }
"""
    with pytest.raises(ConfigError) as info:
        parse(text)
    problems = "\n".join(info.value.problems)
    assert "$.sources.other.pagination.style: Invalid value 'sideways'" in problems
    with pytest.raises(ConfigError) as info:
        parse(text.split("[sources.other]", maxsplit=1)[0])
    problems = "\n".join(info.value.problems)
    for expected in [
        "$.sources.api.key: invalid jq program: syntax error",
        "$.sources.api.body: not JSON",
        '$.sources.api.body: a body needs method = "POST"',
        "$.sources.api.pagination: not with `job`",
        "$.sources.api.since: not with `job`",
        "$.sources.api.since.initial: not a rfc3339 value",
        "$.sources.api.initial_backoff: larger than max_backoff",
        "$.sources.api.rate_limit: unknown rate limit 'nope'",
    ]:
        assert expected in problems, problems


def test_many_pages_in_one_commit_span_several_statements_in_order(conn: sqlite3.Connection) -> None:
    pages = [
        (
            [str(n) for n in range(p * 250, p * 250 + 250)],
            [b"%d" % n for n in range(p * 250, p * 250 + 250)],
            PollState(),
        )
        for p in range(3)
    ]
    committed = commit_pages(conn, "api", pages, [], dedup_window=60, trace="00-trace")
    assert [len(c.events) for c in committed] == [250, 250, 250]
    rows = conn.execute("SELECT seq, id, stream, payload, trace FROM events ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == list(range(1, 751))
    assert [r[3] for r in rows] == [b"%d" % n for n in range(750)]
    assert [r[1] for r in rows] == [event_id for c in committed for event_id, _ in c.events]
    assert {(r[2], r[4]) for r in rows} == {("api", "00-trace")}
    keys = dict(conn.execute("SELECT key, event_id FROM dedup WHERE source = 'api'").fetchall())
    assert keys == {str(n): rows[n][1] for n in range(750)}
