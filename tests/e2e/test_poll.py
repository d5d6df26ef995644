"""Poll sources end to end: the real daemon process, the fake upstream API, a real SQLite file, SIGKILL.

The promise under test: every record the API lists is stored exactly once, whatever
moment the process is killed at — in the middle of a paginated listing or between two
cycles — and the mark and the validators (ETag) survive the restarts.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.fake_api import ApiRequest, FakeApi
from tests.fakes import Daemon, ctl, ctl_json, write_config

API_KEY = "k-" + "7" * 20

SOURCE = """
[control]
socket = "{sock}"

[sources.items]
type = "poll"
url = "{url}/cursor/items?limit=100"
items = ".data"
key = ".id"
interval = "150ms"
jitter = 0
timeout = "2s"
initial_backoff = "50ms"
max_backoff = "200ms"
pagination = {{ style = "cursor", path = ".next_cursor" }}
since = {{ field = ".updated_at", param = "updated_since", overlap = "5s" }}
auth = {{ type = "api_key", query = "api_key", key = "env:FERRY_TEST_API_KEY" }}

[sinks.out]
type = "file"
inputs = ["items"]
path = "out.jsonl"
"""


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi(records=0, hang_seconds=10).start()
    yield fake
    fake.stop()


def stored_ids(db: Path) -> list[int]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT payload FROM events WHERE stream = 'items' ORDER BY seq").fetchall()
    return [json.loads(payload)["id"] for (payload,) in rows]


def poll_state(db: Path) -> dict[str, object]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM poll_state WHERE source = 'items'").fetchone()
    return dict(row) if row else {}


def wait(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def test_10k_records_over_100_pages_are_stored_exactly_once_across_kill_9s(
    tmp_path: Path, sock_dir: Path, api: FakeApi
) -> None:
    api.add(10_000)
    # While set, pages beyond this many answered wait for the kill: however fast the daemon is
    # and however late the test notices, the listing cannot end before the kill lands in it.
    hold_after: list[int] = []
    killed = threading.Event()

    def slow_and_keyed(request: ApiRequest) -> tuple[int, dict[str, str], bytes] | None:
        if request.query.get("api_key") != API_KEY:
            return 401, {"Content-Type": "application/json"}, b'{"error":"bad key"}'
        limit = hold_after[:1]
        if limit and sum(r.status == 200 for r in api.snapshot()) >= limit[0]:
            killed.wait(30)
        time.sleep(0.004)  # ~100 pages take a good half second: room to land a kill inside a listing
        return None

    api.responder = slow_and_keyed
    config = write_config(tmp_path, SOURCE.format(url=api.url, sock=sock_dir / "ferry.sock"))
    db = tmp_path / "state" / "ferry.db"
    daemon = Daemon(config, tmp_path / "ferry.log", env={"FERRY_TEST_API_KEY": API_KEY})

    # Two kills in the middle of the first listing.
    for pages in (20, 60):
        hold_after[:] = [pages + 10]  # the kill lands anywhere in the next ten pages, not past them
        killed.clear()
        daemon.start()

        def served(requests: list[ApiRequest], n: int = pages) -> bool:
            return sum(r.status == 200 for r in requests) >= n

        api.wait_for(served)
        daemon.kill9()
        killed.set()
        state = poll_state(db)
        assert state["next_url"], "the kill was meant to land inside a listing"
        assert "api_key" not in str(state["next_url"])  # the key is added when sending, never stored
        assert 0 < len(stored_ids(db)) < 10_000
    hold_after.clear()

    # The listing completes, then the overlap is asked again (one page) and then answered 304.
    daemon.start()
    api.wait_for(lambda requests: any(r.status == 304 for r in requests))
    etag = next(r for r in reversed(api.snapshot()) if r.status == 304).headers["if-none-match"]
    daemon.kill9()  # between two cycles
    assert poll_state(db)["etag"] == etag
    mark = poll_state(db)["mark"]
    assert mark == api.record(10_000)["updated_at"]

    # After the restart the stored ETag is sent again and answered 304: the validators survived.
    seen = len(api.wait_disconnected())  # the killed process's last request counted as its own
    daemon.start()
    api.wait_for(lambda requests: len(requests) > seen)
    first = api.snapshot()[seen]
    assert first.headers.get("if-none-match") == etag
    assert first.query["updated_since"] == "2026-01-01T00:16:34Z"  # mark 00:16:39 minus the overlap
    api.wait_for(lambda requests: requests[seen].status == 304)

    # New records (and a changed one) arrive; one more kill mid-listing; everything lands once.
    api.add(700)
    api.touch([5])
    api.wait_for(
        lambda requests: any(r.query.get("cursor") and r.monotonic > first.monotonic for r in requests)
    )
    daemon.kill9()
    daemon.start()
    wait(lambda: len(stored_ids(db)) >= 10_700, "the 700 new records")
    status = ctl_json(config, "status")
    daemon.stop()

    ids = stored_ids(db)
    assert sorted(ids) == list(range(1, 10_701)), Counter(ids).most_common(3)
    assert poll_state(db)["mark"] == api.record(5)["updated_at"]
    # The file sink got every event; a kill can repeat a delivery, never with a new id.
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {line["event"]["id"] for line in lines} == set(range(1, 10_701))
    assert len({line["id"] for line in lines}) == 10_700
    assert status["polls"]["items"]["failures"] == 0
    assert status["polls"]["items"]["mark"] == api.record(5)["updated_at"]


AHEAD = """
[sources.items]
type = "poll"
url = "{url}/cursor/items?limit=50"
items = ".data"
key = ".id"
interval = "1h"
timeout = "10s"
pagination = {{ style = "cursor", path = ".next_cursor" }}
since = {{ field = ".updated_at", param = "updated_since", overlap = "5s" }}
"""


def test_a_kill_9_with_pages_read_ahead_and_their_commit_in_flight_loses_and_repeats_nothing(
    tmp_path: Path, api: FakeApi
) -> None:
    api.add(6_000)
    # The 11th page waits until the test holds the write lock: without that gate a fast daemon
    # commits most of the listing before the lock is taken, and nothing is left to read ahead.
    gate = threading.Event()

    def eleventh_page_waits(request: ApiRequest) -> None:
        if len(api.snapshot()) > 10:
            gate.wait(10)

    api.responder = eleventh_page_waits
    config = write_config(tmp_path, AHEAD.format(url=api.url))
    db = tmp_path / "state" / "ferry.db"
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    wait(lambda: len(stored_ids(db)) >= 500, "the first pages")
    # Another connection takes the write lock: the daemon's next commit waits on it (up to its
    # 5 s busy timeout) while the poller reads pages ahead; the kill lands in the middle of that.
    blocker = sqlite3.connect(db, timeout=10)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        committed = len(stored_ids(db))
        assert committed == 500, "the gate holds the listing at ten pages"
        gate.set()
        api.wait_for(lambda requests: len(requests) * 50 >= committed + 1_000, timeout=10)
        daemon.kill9()
        # Every request the killed process sent, also one its handler thread had not read yet
        # when the kill returned: else that one would be taken for the restart's first.
        served = len(api.wait_disconnected())
    finally:
        blocker.rollback()
        blocker.close()
    state = poll_state(db)
    assert state["next_url"], "the kill was meant to land inside the listing"
    assert len(stored_ids(db)) == committed
    assert served * 50 >= committed + 1_000  # pages read ahead of their commit were lost with the process

    daemon.start()
    wait(lambda: len(stored_ids(db)) >= 6_000, "the rest of the listing")
    daemon.stop()
    resumed = api.snapshot()[served]
    assert parse_qs(urlsplit(str(state["next_url"])).query)["cursor"] == [resumed.query["cursor"]]
    ids = stored_ids(db)
    assert sorted(ids) == list(range(1, 6_001)), Counter(ids).most_common(3)
    assert ids == sorted(ids)  # and stored in the order listed


BAD = """
[control]
socket = "{sock}"

[sources.items]
type = "poll"
url = "{url}/cursor/items?limit=50"
items = ".data"
key = ".id"
interval = "100ms"
jitter = 0
timeout = "1s"
initial_backoff = "50ms"
max_backoff = "100ms"
pagination = {{ style = "cursor", path = ".next_cursor" }}
"""


def test_bad_upstream_answers_are_counted_errors_and_nothing_is_lost_or_invented(
    tmp_path: Path, sock_dir: Path, api: FakeApi
) -> None:
    api.add(200)
    for kind in ("garbage", "html", "shape", "hang", "503"):
        api.fault(kind)
    api.fault("repeat", times=2, path="/cursor")
    config = write_config(tmp_path, BAD.format(url=api.url, sock=sock_dir / "ferry.sock"))
    db = tmp_path / "state" / "ferry.db"
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        wait(lambda: len(stored_ids(db)) == 200, "all 200 records")

        def counted() -> bool:
            errors = ctl_json(config, "status")["polls"]["items"]
            return bool(errors["cycles"] >= 1 and errors["failures"] == 0)  # JSON: Any to bool

        wait(counted, "a complete listing after the faults")
        status = ctl_json(config, "status")
        text = ctl(config, "status").stdout
        stats = ctl(config, "stats").stdout
    finally:
        daemon.stop()
    poll = status["polls"]["items"]
    # The hang is one timeout; on a starved machine an ordinary request may time out too.
    timeouts = poll["errors"].pop("timeout", 0)
    assert timeouts >= 1
    assert poll["errors"] == {"not_json": 2, "bad_shape": 1, "http_503": 1, "stuck_cursor": 1}
    assert sorted(stored_ids(db)) == list(range(1, 201))
    assert all(actor["restarts"] == 0 for actor in status["actors"])
    warnings = [line for line in daemon.logs() if line.get("msg") == "poll failed"]
    assert {line["kind"] for line in warnings} == {*poll["errors"], "timeout"}
    assert any("response is not JSON (text/html" in line["error"] for line in warnings)
    assert "SOURCE" in text
    assert "items" in text
    assert f"bad_shape 1, http_503 1, not_json 2, stuck_cursor 1, timeout {timeouts}" in stats


RELOADED = """
[control]
socket = "{sock}"

[sources.hook]
type = "webhook"
{poll}
[sinks.out]
type = "file"
inputs = [{inputs}]
path = "out.jsonl"
"""

POLL = """
[sources.items]
type = "poll"
url = "{url}/page/items"
items = ".data"
key = ".id"
interval = "{interval}"
jitter = 0
pagination = {{ style = "page", size = 100 }}
"""


def test_reload_starts_replaces_and_stops_a_poller(tmp_path: Path, sock_dir: Path, api: FakeApi) -> None:
    api.add(150)
    sock = sock_dir / "ferry.sock"
    config = write_config(tmp_path, RELOADED.format(sock=sock, poll="", inputs='"hook"'))
    db = tmp_path / "state" / "ferry.db"
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:

        def reload_to(poll: str, inputs: str) -> str:
            config.write_text(
                config.read_text().split("[control]")[0]
                + RELOADED.format(sock=sock, poll=poll, inputs=inputs)
            )
            done = ctl(config, "reload")
            assert done.returncode == 0, done.stderr
            return done.stdout

        added = reload_to(POLL.format(url=api.url, interval="100ms"), '"hook", "items"')
        assert "added    sources.items" in added
        wait(lambda: len(stored_ids(db)) == 150, "the records of the added poller")

        changed = reload_to(POLL.format(url=api.url, interval="50ms"), '"hook", "items"')
        assert "changed  sources.items" in changed
        api.add(10)
        wait(lambda: len(stored_ids(db)) == 160, "the new records, read by the replacement")
        actors = {a["name"]: a for a in ctl_json(config, "status")["actors"]}
        assert actors["poll.items"]["state"] == "running"

        # A pause holds the source (after its cycle), outlives a reload, and a resume polls at once.
        assert ctl(config, "pause", "items").returncode == 0
        wait(lambda: ctl_json(config, "status")["polls"]["items"]["state"] == "paused", "the pause")
        api.add(5)
        reload_to(POLL.format(url=api.url, interval="60s"), '"hook", "items"')
        status = ctl_json(config, "status")
        assert status["polls"]["items"]["state"] == "paused"
        assert "items" in status["paused"]
        assert len(stored_ids(db)) == 160
        assert ctl(config, "resume", "items").returncode == 0
        wait(lambda: len(stored_ids(db)) == 165, "the records added while paused, at once", timeout=10)

        removed = reload_to("", '"hook"')
        assert "removed  sources.items" in removed
        after = len(api.snapshot())
        assert "poll.items" not in {a["name"] for a in ctl_json(config, "status")["actors"]}
        time.sleep(0.5)  # ten intervals of the removed poller: none of them may poll
        assert len(api.snapshot()) == after
    finally:
        daemon.stop()
    assert sorted(stored_ids(db)) == list(range(1, 166))


def test_drain_stops_poll_sources_too(tmp_path: Path, sock_dir: Path, api: FakeApi) -> None:
    api.add(50)
    sock = sock_dir / "ferry.sock"
    poll = POLL.format(url=api.url, interval="50ms")
    config = write_config(tmp_path, RELOADED.format(sock=sock, poll=poll, inputs='"hook", "items"'))
    db = tmp_path / "state" / "ferry.db"
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        wait(lambda: len(stored_ids(db)) == 50, "the first records")
        drained = ctl(config, "drain", "--timeout", "20s")
        assert drained.returncode == 0, drained.stderr
        assert daemon.wait() == 0
    finally:
        daemon.stop()
    lines = [
        json.loads(line) for line in (tmp_path / "ferry.log").read_text().splitlines() if line.startswith("{")
    ]
    assert any(line["msg"] == "poll source paused" and line.get("source") == "items" for line in lines)


TWELVE = """
[sources.items]
type = "poll"
url = "{url}/cursor/items?limit=100"
items = ".data"
key = '"\\(.id)@\\(.name)"'
interval = "100ms"
jitter = 0
timeout = "5s"
pagination = {{ style = "cursor", path = ".next_cursor" }}
"""


def cycles_of(requests: list[ApiRequest]) -> list[list[ApiRequest]]:
    """The requests grouped by cycle (each begins with the first page: no `cursor`; any before the
    first of them are left out)."""
    cycles: list[list[ApiRequest]] = []
    for request in requests:
        if "cursor" not in request.query:
            cycles.append([])
        if cycles:
            cycles[-1].append(request)
    return cycles


def test_a_12_page_listing_polled_5_times_spends_the_quota_of_one_and_a_change_on_page_7_is_read(
    tmp_path: Path, api: FakeApi
) -> None:
    api.add(1_200)  # twelve pages of 100; the twelfth ends the listing
    config = write_config(tmp_path, TWELVE.format(url=api.url))
    db = tmp_path / "state" / "ferry.db"
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        api.wait_for(lambda requests: len(cycles_of(requests)) >= 6)  # five cycles done, a sixth begun
        first_five = cycles_of(api.snapshot())[:5]
        assert [len(cycle) for cycle in first_five] == [12] * 5
        assert all(r.status == 200 and "if-none-match" not in r.headers for r in first_five[0])
        # Every later page went out with the validator of its last answer and came back 304 (free).
        for cycle in first_five[1:]:
            assert all(r.headers.get("if-none-match") and r.status == 304 for r in cycle), [
                (r.query, r.status) for r in cycle
            ]
        spent = sum(r.status != 304 for cycle in first_five for r in cycle)
        assert spent == len(first_five[0]) == 12  # five cycles cost the quota of the first
        assert sorted(stored_ids(db)) == list(range(1, 1_201))

        # The validators are durable: after a kill -9 the next listing is 304s again.
        daemon.kill9()
        restarted = len(api.wait_disconnected())  # else a last page 1 of the killed one begins `again`
        daemon.start()
        api.wait_for(lambda requests: len(cycles_of(requests[restarted:])) >= 2)
        again = cycles_of(api.snapshot()[restarted:])[0]
        assert len(again) == 12
        assert all(r.status == 304 for r in again)

        # One record on page 7 changes (its key carries its name): the next cycle reads page 7
        # in full, 304s for the other eleven, and stores the change once.
        api.edit([650])
        seen = len(api.snapshot())
        wait(lambda: len(stored_ids(db)) == 1_201, "the changed record")
        api.wait_for(lambda requests: len(cycles_of(requests[seen:])) >= 2)
    finally:
        daemon.stop()
    # Before the edit every cycle since the restart was all 304s: the first with a 200 read the change.
    changed = next(
        cycle for cycle in cycles_of(api.snapshot()[restarted:]) if any(r.status == 200 for r in cycle)
    )
    assert len(changed) == 12
    assert [position for position, r in enumerate(changed, 1) if r.status != 304] == [7]
    ids = stored_ids(db)
    assert sorted(ids) == sorted([*range(1, 1_201), 650])
    with sqlite3.connect(db) as conn:
        names = [json.loads(p)["name"] for (p,) in conn.execute("SELECT payload FROM events ORDER BY seq")]
        pages = conn.execute("SELECT count(*) FROM poll_pages WHERE source = 'items'").fetchone()[0]
    assert names[-1] == "item-650'"
    assert pages == 12  # one row of validators per page
