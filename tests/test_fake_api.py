"""The fake upstream API itself: other tests trust its paging, validators, quota and faults."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fake_api import ApiRequest, FakeApi


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi(records=250, per_second=10).start()
    yield fake
    fake.stop()


def read_all(client: httpx.Client, api: FakeApi, style: str, **query: Any) -> tuple[list[int], int]:
    """Every record id through one pagination style, and how many requests it took."""
    url: str | None = f"{api.url}/{style}/items"
    params: dict[str, Any] | None = {"per_page" if style == "page" else "limit": 100, **query}
    ids: list[int] = []
    requests = 0
    while url is not None and requests < 50:
        response = client.get(url, params=params)
        requests += 1
        body = response.json()
        items = body if style == "link" else body["data"]
        ids += [item["id"] for item in items]
        if style == "link":
            url, params = response.links.get("next", {}).get("url"), None
        elif style == "cursor":
            url = url if body["next_cursor"] else None
            assert params is not None
            params["cursor"] = body["next_cursor"]
        elif len(items) < 100:
            url = None
        else:
            assert params is not None
            key, step = ("page", 1) if style == "page" else ("offset", 100)
            params[key] = params.get(key, 1 if style == "page" else 0) + step
    return ids, requests


@pytest.mark.parametrize("style", ["link", "cursor", "page", "offset"])
def test_every_style_serves_each_record_once_in_order(api: FakeApi, style: str) -> None:
    with httpx.Client() as client:
        ids, requests = read_all(client, api, style)
    assert ids == list(range(1, 251))
    assert requests == 3


def test_updated_since_is_inclusive_and_touch_moves_a_record_last(api: FakeApi) -> None:
    api.touch([5])
    with httpx.Client() as client:
        ids, _ = read_all(client, api, "cursor", updated_since="2026-01-01T00:00:24Z")
    assert ids == [*range(241, 251), 5]  # second 24 holds records 241-250; record 5 is now later still


def test_etag_and_last_modified_answer_304_until_the_data_changes(api: FakeApi) -> None:
    with httpx.Client() as client:
        first = client.get(f"{api.url}/page/items")
        etag, modified = first.headers["etag"], first.headers["last-modified"]
        assert client.get(f"{api.url}/page/items", headers={"if-none-match": etag}).status_code == 304
        assert client.get(f"{api.url}/page/items", headers={"if-modified-since": modified}).status_code == 304
        api.touch([5])  # record 5 leaves the first page
        assert client.get(f"{api.url}/page/items", headers={"if-none-match": etag}).status_code == 200
        assert client.get(f"{api.url}/page/items", headers={"if-modified-since": modified}).status_code == 200


def test_quota_answers_429_with_retry_after_and_records_every_request(api: FakeApi) -> None:
    api.quota = (3, 30.0)
    api.ratelimit_headers = True
    with httpx.Client() as client:
        answers = [client.get(f"{api.url}/page/items") for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    assert 1 <= int(answers[3].headers["retry-after"]) <= 30
    assert answers[2].headers["ratelimit-remaining"] == "0"
    assert answers[2].headers["x-ratelimit-remaining"] == "0"
    assert [r.status for r in api.snapshot()] == [200, 200, 200, 429, 429]


def test_faults_are_served_in_order_then_normal_answers_resume(api: FakeApi) -> None:
    api.hang_seconds = 5
    api.fault("html")
    api.fault("garbage")
    api.fault("shape")
    api.fault("503")
    api.fault("hang")
    with httpx.Client(timeout=0.5) as client:
        assert client.get(f"{api.url}/page/items").headers["content-type"].startswith("text/html")
        with pytest.raises(ValueError, match="Expecting"):
            client.get(f"{api.url}/page/items").json()
        assert client.get(f"{api.url}/page/items").json() == {"unexpected": True}
        assert client.get(f"{api.url}/page/items").status_code == 503
        with pytest.raises(httpx.ReadTimeout):
            client.get(f"{api.url}/page/items")
        api.release()
        assert len(client.get(f"{api.url}/page/items").json()["data"]) == 100
    assert api.snapshot()[4].status == -1


def test_wait_disconnected_counts_a_request_sent_just_before_its_client_died(api: FakeApi) -> None:
    held = threading.Event()

    def first_is_held(request: ApiRequest) -> None:
        if request.query.get("n") == "1":
            held.wait(10)

    api.responder = first_is_held
    with socket.create_connection(("127.0.0.1", api.port)) as client:
        client.sendall(b"".join(b"GET /page/items?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in (1, 2)))
        client.shutdown(socket.SHUT_WR)  # the client has said all it will say
        api.wait_for(lambda requests: len(requests) == 1)
        # The second request is sent and not yet read (as a kill -9 can leave the last request of
        # the dead process): the connection counts as open until the handler has read everything.
        with pytest.raises(AssertionError, match="1 connection"):
            api.wait_disconnected(timeout=0.1)
        assert len(api.snapshot()) == 1
        held.set()
        assert [r.query["n"] for r in api.wait_disconnected()] == ["1", "2"]
    assert api.connections == 0


def test_a_repeating_cursor_names_the_same_page_again(api: FakeApi) -> None:
    api.fault("repeat", times=2, path="/cursor")
    with httpx.Client() as client:
        first = client.get(f"{api.url}/cursor/items").json()["next_cursor"]
        second = client.get(f"{api.url}/cursor/items", params={"cursor": first}).json()["next_cursor"]
    assert first == second


def test_a_job_runs_then_is_done_with_its_input(api: FakeApi) -> None:
    api.job_polls = 1
    with httpx.Client() as client:
        submitted = client.post(f"{api.url}/jobs", json={"report": "daily"})
        assert submitted.status_code == 202
        status_url = submitted.json()["status_url"]
        assert client.get(status_url).json()["state"] == "running"
        assert client.get(status_url).json() == {
            "id": "job-1",
            "state": "done",
            "result": {"input": {"report": "daily"}},
        }


@pytest.mark.parametrize("style", ["link", "cursor", "page", "offset"])
def test_direction_desc_serves_newest_first_in_every_style(api: FakeApi, style: str) -> None:
    api.touch([5])
    with httpx.Client() as client:
        ids, requests = read_all(client, api, style, direction="desc")
    assert ids == [5, *range(250, 5, -1), *range(4, 0, -1)]
    assert requests == 3


def test_a_304_is_free_as_on_github_and_counted_apart(api: FakeApi) -> None:
    api.quota = (2, 30.0)
    with httpx.Client() as client:
        first = client.get(f"{api.url}/cursor/items")
        etag = first.headers["etag"]
        statuses = [client.get(f"{api.url}/cursor/items", headers={"if-none-match": etag}).status_code]
        statuses += [client.get(f"{api.url}/cursor/items").status_code for _ in range(2)]
    assert statuses == [304, 200, 429]
    assert (api.spent, api.not_modified) == (2, 1)


@pytest.mark.parametrize(
    ("etags", "weak", "same_after_append", "same_twice"),
    [
        ("body", False, True, True),  # the first page did not change: same ETag
        ("version", False, False, True),  # any change anywhere: a new ETag on every page
        ("changing", False, False, False),
        ("body", True, True, True),
    ],
)
def test_etag_modes(api: FakeApi, etags: str, weak: bool, same_after_append: bool, same_twice: bool) -> None:
    api.etags, api.weak_etags = etags, weak
    with httpx.Client() as client:
        first = client.get(f"{api.url}/page/items").headers["etag"]
        twice = client.get(f"{api.url}/page/items").headers["etag"]
        api.add(1)  # lands on the last page
        after = client.get(f"{api.url}/page/items").headers["etag"]
        weakly = client.get(
            f"{api.url}/page/items", headers={"if-none-match": f'"x", {after.removeprefix("W/")}'}
        )
    assert first.startswith('W/"') == weak
    assert (first == twice) == same_twice
    assert (first == after) == same_after_append
    assert weakly.status_code == (304 if same_twice else 200)  # a list, compared weakly


def test_no_etag_leaves_last_modified(api: FakeApi) -> None:
    api.etags = "none"
    with httpx.Client() as client:
        answer = client.get(f"{api.url}/page/items")
    assert "etag" not in answer.headers
    assert answer.headers["last-modified"]
