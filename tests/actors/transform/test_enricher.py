"""Enrichment lookups against a real local HTTP server: cache, negative cache, single flight, failures."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import msgspec
import pytest
import trio

from actors.transform.enricher import MISSING, Enricher, TtlCache
from daemon.config.limits import RateLimitConfig
from daemon.config.sync import EnrichConfig
from daemon.config.units import Duration, dec_hook
from daemon.limits.ratelimit import RateLimiter
from daemon.store.outbox import StoredEvent
from tests.fakes import FakeReceiver, Received, Reply

ACCOUNTS = {"a1": {"name": "Acme", "tier": "gold"}, "a 2/x": {"name": "Slash & Co", "tier": "silver"}}


def accounts(request: Received) -> Reply:
    """GET /accounts/ID: the account, 404 if unknown; /slow/ID answers after 0.3 s."""
    path = request.path
    if path.startswith("/slow/"):
        time.sleep(0.3)
        path = "/accounts/" + path.removeprefix("/slow/")
    account = ACCOUNTS.get(unquote(path.removeprefix("/accounts/")))
    if account is None:
        return 404, {}, b'{"error":"not found"}'
    return 200, {"content-type": "application/json"}, json.dumps(account).encode()


@pytest.fixture
def server() -> Iterator[FakeReceiver]:
    fake = FakeReceiver(accounts).start()
    yield fake
    fake.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def enricher(url: str, clock: Clock | None = None, **settings: Any) -> Enricher:
    settings.setdefault("merge", ". + {account: $lookup.name}")
    settings.setdefault("retry", {"max_attempts": 3, "initial_backoff": "10ms", "max_backoff": "20ms"})
    config = msgspec.convert({"url": url, **settings}, EnrichConfig, dec_hook=dec_hook)
    return Enricher("contacts", config, clock=clock or Clock())


def events(*bodies: dict[str, Any]) -> list[StoredEvent]:
    return [StoredEvent(n, f"e{n}", "crm", json.dumps(body).encode(), None) for n, body in enumerate(bodies)]


def bodies(merged: list[StoredEvent]) -> list[Any]:
    return [json.loads(event.payload) for event in merged]


async def test_a_burst_for_one_record_costs_one_call_and_each_event_is_merged(server: FakeReceiver) -> None:
    enrich = enricher(server.url + "/accounts/{.account}")
    merged, failed = await enrich.enrich(events(*({"id": n, "account": "a1"} for n in range(20))))

    assert failed == []
    assert bodies(merged) == [{"id": n, "account": "Acme"} for n in range(20)]
    assert len(server.snapshot()) == 1
    assert enrich.hits + enrich.shared == 19


async def test_the_cache_expires_after_its_ttl(server: FakeReceiver) -> None:
    clock = Clock()
    enrich = enricher(server.url + "/accounts/{.account}", clock, cache_ttl="60s")
    await enrich.enrich(events({"account": "a1"}))
    clock.now += 59
    await enrich.enrich(events({"account": "a1"}))
    assert len(server.snapshot()) == 1, "a hit within the ttl"
    clock.now += 2
    await enrich.enrich(events({"account": "a1"}))
    assert len(server.snapshot()) == 2, "a miss once it expired"


async def test_a_404_merges_null_and_is_cached_for_the_negative_ttl(server: FakeReceiver) -> None:
    clock = Clock()
    enrich = enricher(
        server.url + "/accounts/{.account}", clock, negative_ttl="10s", merge=". + {found: $lookup}"
    )
    merged, failed = await enrich.enrich(events({"account": "nobody"}, {"account": "nobody"}))
    assert failed == []
    assert bodies(merged) == [{"account": "nobody", "found": None}] * 2
    assert len(server.snapshot()) == 1
    clock.now += 11
    await enrich.enrich(events({"account": "nobody"}))
    assert len(server.snapshot()) == 2


async def test_concurrent_misses_share_one_request(server: FakeReceiver) -> None:
    enrich = enricher(server.url + "/slow/{.account}", cache_ttl="0s", concurrency=16)
    merged, failed = await enrich.enrich(events(*({"account": "a1"} for _ in range(10))))

    assert failed == []
    assert len(merged) == 10
    assert len(server.snapshot()) == 1, "one request for ten concurrent misses"
    assert enrich.shared == 9


async def test_placeholders_are_percent_encoded(server: FakeReceiver) -> None:
    enrich = enricher(server.url + "/accounts/{.account}")
    merged, _ = await enrich.enrich(events({"account": "a 2/x"}))
    assert bodies(merged) == [{"account": "Slash & Co"}]
    assert server.snapshot()[0].path == "/accounts/a%202%2Fx"


async def test_events_for_which_when_is_false_pass_unchanged_without_a_call(server: FakeReceiver) -> None:
    enrich = enricher(server.url + "/accounts/{.account}", when=".account != null")
    merged, failed = await enrich.enrich(events({"id": 1}, {"id": 2, "account": "a1"}))
    assert failed == []
    assert bodies(merged) == [{"id": 1}, {"id": 2, "account": "Acme"}]
    assert len(server.snapshot()) == 1


class Failing:
    """Answers `status` (with `body`) to /bad/…, and the accounts to everything else."""

    def __init__(
        self, status: int, body: bytes = b'{"error":"no"}', headers: dict[str, str] | None = None
    ) -> None:
        self.status, self.body, self.headers = status, body, headers or {}
        self.hang = threading.Event()

    def __call__(self, request: Received) -> Reply:
        if request.path.startswith("/bad/"):
            if self.status == 0:
                self.hang.wait(5)
                return -1, {}, b""
            return self.status, self.headers, self.body
        return accounts(request)


@pytest.mark.parametrize(
    ("status", "body", "requests", "reason"),
    [
        (503, b"busy", 3, "lookup {url} failed after 3 attempts: HTTP 503: busy"),
        (429, b"slow down", 3, "lookup {url} failed after 3 attempts: HTTP 429: slow down"),
        (403, b'{"error":"no"}', 1, 'lookup {url}: HTTP 403: {"error":"no"}'),
        (200, b"<html>oops</html>", 1, "lookup {url}: HTTP 200: answer is not JSON: '<html>oops</html>'"),
    ],
)
async def test_failed_lookups_dead_letter_that_event_only(
    server: FakeReceiver, status: int, body: bytes, requests: int, reason: str
) -> None:
    server.responder = Failing(status, body)
    enrich = enricher(server.url + "/{.path}/{.account}")
    merged, failed = await enrich.enrich(
        events({"path": "bad", "account": "x"}, {"path": "accounts", "account": "a1"})
    )

    assert bodies(merged) == [{"path": "accounts", "account": "Acme"}]
    ((event, why, attempts),) = failed
    assert event.id == "e0"
    assert why == reason.replace("{url}", server.url + "/bad/x")
    assert len([r for r in server.snapshot() if r.path.startswith("/bad/")]) == requests
    assert attempts == requests  # the dead letter's attempt count (issue 13)


async def test_a_lookup_that_never_answers_times_out_and_is_retried(server: FakeReceiver) -> None:
    failing = Failing(0)
    server.responder = failing
    enrich = enricher(
        server.url + "/bad/{.account}", timeout="100ms", retry={"max_attempts": 2, "initial_backoff": "10ms"}
    )
    try:
        with trio.fail_after(5):
            merged, failed = await enrich.enrich(events({"account": "x"}))
    finally:
        failing.hang.set()
    assert merged == []
    assert failed[0][1].endswith("failed after 2 attempts: timed out after 0.1s")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"id": 1}, "enrich.url: {.account} is null, expected a string or number"),
        ({"account": {"x": 1}}, 'enrich.url: {.account} is {"x":1}, expected a string or number'),
        ({"account": [1, 2]}, "enrich.url: {.account} is [1,2], expected a string or number"),
        ({"account": True}, "enrich.url: {.account} is true, expected a string or number"),
    ],
)
async def test_a_bad_placeholder_is_dead_lettered_without_a_call(
    server: FakeReceiver, body: dict[str, Any], reason: str
) -> None:
    enrich = enricher(server.url + "/accounts/{.account}")
    merged, failed = await enrich.enrich(events(body))
    assert merged == []
    assert failed[0][1] == reason
    assert server.snapshot() == []


@pytest.mark.parametrize(
    ("merge", "reason"),
    [
        ("empty", "enrich.merge gave 0 values, expected one"),
        (". , .", "enrich.merge gave 2 values, expected one"),
        ('error("bad account")', "enrich.merge: jq: bad account"),
    ],
)
async def test_a_merge_that_is_not_one_value_is_dead_lettered(
    server: FakeReceiver, merge: str, reason: str
) -> None:
    enrich = enricher(server.url + "/accounts/{.account}", merge=merge)
    _, failed = await enrich.enrich(events({"account": "a1"}))
    assert failed[0][1].startswith(reason)


def test_the_cache_drops_the_least_recently_used_beyond_its_size() -> None:
    clock = Clock()
    cache = TtlCache(2, clock)
    cache.put("a", 1, 10)
    cache.put("b", 2, 10)
    assert cache.get("a") == 1  # a is now the most recently used
    cache.put("c", 3, 10)
    assert cache.get("b") is MISSING
    assert cache.get("a") == 1
    assert cache.get("c") == 3
    assert len(cache) == 2


async def test_each_lookup_request_takes_a_permit_and_cache_hits_take_none(server: FakeReceiver) -> None:
    limiter = RateLimiter("accounts", RateLimitConfig(rate=1000, per=Duration(1), burst=100))
    config = msgspec.convert(
        {"url": server.url + "/accounts/{.account}", "merge": ".", "rate_limit": "accounts"},
        EnrichConfig,
        dec_hook=dec_hook,
    )
    enrich = Enricher("contacts", config, limiter=limiter, clock=Clock())
    await enrich.enrich(events({"account": "a1"}, {"account": "a1"}, {"account": "nobody"}))
    assert limiter.granted["transforms.contacts"] == 2
    assert len(server.snapshot()) == 2
