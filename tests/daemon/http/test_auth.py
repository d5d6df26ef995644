"""Outbound auth against a real (fake) token endpoint on 127.0.0.1: caching, early refresh,
single flight, the 401 path, rotation kept in the store, failures that name no secret."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import jwt
import msgspec
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from daemon.config import root as cfg
from daemon.config.auth import AuthConfig
from daemon.config.units import dec_hook
from daemon.errors import ConfigError, RetryableDelivery
from daemon.http.auth import Auth, build_auth, with_query
from daemon.http.tokens import make_token
from daemon.store.sqlite import Store
from tests.fake_oauth import TokenServer

SECRET = "s3cret-client-value"


def auth_config(**fields: Any) -> AuthConfig:
    config: AuthConfig = msgspec.convert(fields, AuthConfig, dec_hook=dec_hook)
    return config


@pytest.fixture
def server() -> Iterator[TokenServer]:
    server = TokenServer(client_secret=SECRET).start()
    yield server
    server.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def oauth(server: TokenServer, clock: Clock | None = None, store: Store | None = None, **more: Any) -> Auth:
    fields = {"type": "oauth2", "token_url": server.url, "client_id": "ferry-client", **more}
    fields.setdefault("client_secret", SECRET)
    return build_auth(auth_config(**fields), owner="sinks.crm", store=store, clock=clock or Clock())


# -- static kinds ---------------------------------------------------------------------------------


async def test_static_kinds_give_fixed_headers_or_query() -> None:
    key = build_auth(auth_config(type="api_key", key="k-1"), owner="x")
    assert await key.headers() == {"x-api-key": "k-1"}
    named = build_auth(
        auth_config(type="api_key", key="k-1", header="Authorization", prefix="Token "), owner="x"
    )
    assert await named.headers() == {"authorization": "Token k-1"}
    query = build_auth(auth_config(type="api_key", key="k 1", query="api_key"), owner="x")
    assert await query.headers() == {}
    assert with_query("http://h/p?a=1&api_key=old", query.query) == "http://h/p?a=1&api_key=k+1"
    basic = build_auth(auth_config(type="basic", username="me", password="pw"), owner="x")
    assert await basic.headers() == {"authorization": "Basic " + base64.b64encode(b"me:pw").decode()}
    bearer = build_auth(auth_config(type="bearer", token="t-1"), owner="x")
    assert await bearer.headers() == {"authorization": "Bearer t-1"}
    assert await bearer.unauthorized({"authorization": "Bearer t-1"}) is False  # nothing to refresh
    assert "t-1" not in repr(bearer)


@pytest.mark.parametrize(
    ("lifetime", "refresh_before", "expires", "refresh"),
    [
        (3600, 60, 4600, 4540),  # refresh a minute early
        (60, 60, 1060, 1030),  # never earlier than half the lifetime
        (None, 60, float("inf"), float("inf")),  # no expires_in: until a 401
    ],
)
def test_when_a_token_is_refreshed(
    lifetime: float | None, refresh_before: float, expires: float, refresh: float
) -> None:
    token = make_token("t", 1000, lifetime, refresh_before)
    assert (token.expires_at, token.refresh_at) == (expires, refresh)


# -- oauth2 ---------------------------------------------------------------------------------------


async def test_fifty_concurrent_requests_cause_one_token_request(server: TokenServer) -> None:
    server.delay = 0.2  # every waiter arrives while the one request is in flight
    auth = oauth(server)
    seen: list[dict[str, str]] = []

    async def one() -> None:
        seen.append(await auth.headers())

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(one)
    assert server.count() == 1
    assert seen == [{"authorization": "Bearer access-1"}] * 50
    assert server.requests[0]["grant_type"] == "client_credentials"
    assert server.requests[0]["_authorization"].startswith("Basic ")  # client_auth = "basic"
    await auth.aclose()


async def test_token_is_refreshed_before_it_expires_while_others_keep_the_old_one(
    server: TokenServer,
) -> None:
    server.expires_in = 100
    clock = Clock()
    auth = oauth(server, clock, refresh_before="30s")
    assert await auth.headers() == {"authorization": "Bearer access-1"}
    clock.now += 69  # before refresh time: cached
    assert await auth.headers() == {"authorization": "Bearer access-1"}
    assert server.count() == 1
    clock.now += 2  # inside the last 30 s: one caller refreshes, the others use the valid token
    server.delay = 0.2
    results: list[str] = []

    async def one() -> None:
        results.append((await auth.headers())["authorization"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        await trio.sleep(0.05)
        for _ in range(5):
            nursery.start_soon(one)
    assert server.count() == 2
    assert sorted(results) == ["Bearer access-1"] * 5 + ["Bearer access-2"]
    assert await auth.headers() == {"authorization": "Bearer access-2"}
    await auth.aclose()


async def test_an_expired_token_is_never_used(server: TokenServer) -> None:
    server.expires_in = 10
    clock = Clock()
    auth = oauth(server, clock)
    await auth.headers()
    clock.now += 11
    server.fail_with = (503, {}, b"down")
    with pytest.raises(RetryableDelivery, match="HTTP 503"):
        await auth.headers()


async def test_a_401_forces_one_refresh_shared_by_every_request_that_got_it(server: TokenServer) -> None:
    auth = oauth(server)
    used = await auth.headers()
    server.delay = 0.1
    answers: list[bool] = []

    async def refused() -> None:
        answers.append(await auth.unauthorized(used))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(refused)
    assert answers == [True] * 20
    assert server.count() == 2
    assert await auth.headers() == {"authorization": "Bearer access-2"}
    # A late 401 for the old token does not refresh again: a newer one is already here.
    assert await auth.unauthorized(used) is True
    assert server.count() == 2


async def test_client_auth_in_the_body_and_extra_params(server: TokenServer) -> None:
    auth = oauth(server, client_auth="body", scope="read write", params={"audience": "crm"})
    assert await auth.headers() == {"authorization": "Bearer access-1"}
    form = server.requests[0]
    assert (form["client_id"], form["client_secret"], form["scope"], form["audience"]) == (
        "ferry-client",
        SECRET,
        "read write",
        "crm",
    )
    assert form["_authorization"] == ""


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ((500, {}, b"<html>oops</html>"), r"HTTP 500$"),
        ((400, {}, b'{"error":"invalid_scope","error_description":"no"}'), "HTTP 400 invalid_scope: no"),
        ((200, {}, b"not json"), "unusable answer"),
        ((200, {}, b'{"token_type":"Bearer"}'), "unusable answer"),
        ((200, {}, b'{"access_token":""}'), "empty access_token"),
        # a careless server echoing what it was sent: the secret is scrubbed
        (
            (400, {}, b'{"error":"invalid_client","error_description":"bad secret s3cret-client-value"}'),
            r"invalid_client: bad secret \*\*\*",
        ),
    ],
)
async def test_token_endpoint_failures_are_retryable_and_name_no_secret(
    server: TokenServer, reply: tuple[int, dict[str, str], bytes], expected: str
) -> None:
    server.fail_with = reply
    auth = oauth(server)
    with pytest.raises(RetryableDelivery, match=expected) as caught:
        await auth.headers()
    message = str(caught.value)
    assert message.startswith(f"oauth2 token request to {server.url}")
    assert SECRET not in message


async def test_wrong_client_secret_and_unreachable_endpoint(server: TokenServer) -> None:
    wrong = oauth(server, client_secret="not-the-secret")
    with pytest.raises(RetryableDelivery, match="HTTP 401 invalid_client") as caught:
        await wrong.headers()
    assert "not-the-secret" not in str(caught.value)
    server.stop()
    gone = oauth(server)
    with pytest.raises(RetryableDelivery, match="connection refused"):
        await gone.headers()
    server.start()  # the fixture stops it again


async def test_a_hanging_token_endpoint_times_out(server: TokenServer) -> None:
    server.delay = 3
    auth = oauth(server, timeout="300ms")
    with trio.fail_after(2), pytest.raises(RetryableDelivery, match=r"timed out after 0\.3s"):
        await auth.headers()


async def test_a_failure_is_shared_by_the_waiters_and_held_briefly(server: TokenServer) -> None:
    server.delay, server.fail_with = 0.1, (503, {}, b"")
    auth = oauth(server)
    errors: list[str] = []

    async def one() -> None:
        try:
            await auth.headers()
        except RetryableDelivery as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
    assert len(errors) == 10
    assert server.count() == 1


async def test_rotated_refresh_token_is_kept_in_the_store_until_the_config_changes(
    server: TokenServer, store: Store
) -> None:
    server.rotate = True
    server.refresh_tokens.add("refresh-0")
    first = oauth(server, store=store, grant="refresh_token", refresh_token="refresh-0")
    await first.headers()
    rotated = server.requests[0]
    assert rotated["refresh_token"] == "refresh-0"
    (stored,) = server.refresh_tokens
    # A new incarnation (a restart) uses the stored, rotated token: the configured one is spent.
    second = oauth(server, store=store, grant="refresh_token", refresh_token="refresh-0")
    await second.headers()
    assert server.requests[1]["refresh_token"] == stored
    # An operator who re-authorises puts a new token in the config: it wins over the stored one.
    server.refresh_tokens.add("refresh-fresh")
    third = oauth(server, store=store, grant="refresh_token", refresh_token="refresh-fresh")
    await third.headers()
    assert server.requests[2]["refresh_token"] == "refresh-fresh"
    raw = await store.call(lambda conn: conn.execute("SELECT token FROM auth_tokens").fetchall())
    assert len(raw) == 1


# -- jwt_bearer -----------------------------------------------------------------------------------


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_jwt_bearer_signs_its_own_token(algorithm: str) -> None:
    key = (
        rsa.generate_private_key(65537, 2048)
        if algorithm == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    clock = Clock()
    auth = build_auth(
        auth_config(
            type="jwt_bearer",
            private_key=_pem(key),
            algorithm=algorithm,
            issuer="ferry@example",
            audience="https://api.example",
            key_id="k1",
            lifetime="10m",
            claims={"scope": "crm"},
        ),
        owner="sinks.crm",
        clock=clock,
    )
    token = (await auth.headers())["authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, key.public_key(), algorithms=[algorithm], audience="https://api.example")
    assert (claims["iss"], claims["sub"], claims["scope"], claims["exp"] - claims["iat"]) == (
        "ferry@example",
        "ferry@example",
        "crm",
        600,
    )
    assert jwt.get_unverified_header(token)["kid"] == "k1"
    assert (await auth.headers())["authorization"] == f"Bearer {token}"  # cached
    clock.now += 600 - 59  # within refresh_before of its expiry: signed anew
    assert (await auth.headers())["authorization"] != f"Bearer {token}"


async def test_jwt_bearer_grant_trades_the_assertion_for_a_token(server: TokenServer) -> None:
    key = rsa.generate_private_key(65537, 2048)
    server.public_key = key.public_key()
    auth = build_auth(
        auth_config(type="jwt_bearer", private_key=_pem(key), issuer="svc@example", token_url=server.url),
        owner="sinks.crm",
    )
    assert await auth.headers() == {"authorization": "Bearer access-1"}
    assert server.requests[0]["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    other = rsa.generate_private_key(65537, 2048)
    forged = build_auth(
        auth_config(type="jwt_bearer", private_key=_pem(other), issuer="svc@example", token_url=server.url),
        owner="sinks.crm",
    )
    with pytest.raises(RetryableDelivery, match="invalid_grant: bad assertion") as caught:
        await forged.headers()
    assert "BEGIN PRIVATE KEY" not in str(caught.value)


# -- config ---------------------------------------------------------------------------------------

SINK = """
[sources.in]
type = "webhook"
[sinks.out]
type = "http"
inputs = ["in"]
url = "https://127.0.0.1:9/x"
"""


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ('auth = { type = "api_key", key = "k", header = "X-Key", query = "k" }', "set `header` or `query`"),
        (
            'auth = { type = "oauth2", token_url = "https://t", client_id = "c", grant = "refresh_token" }',
            "auth.refresh_token: required",
        ),
        (
            'auth = { type = "oauth2", token_url = "https://t", client_id = "c" }',
            "auth.client_secret: required",
        ),
        (
            'auth = { type = "oauth2", token_url = "ftp://t", client_id = "c", client_secret = "s" }',
            "auth.token_url",
        ),
        ('auth = { type = "kerberos" }', "auth"),
        ('auth = { type = "bearer" }', "token"),
        ('tls = { cert = "c.pem" }', "`cert` and `key` go together"),
        ('tls = { ca = "missing-ca.pem" }', "tls: ca "),
        (
            'auth = { type = "jwt_bearer", issuer = "i", private_key = "not a pem" }',
            "auth.private_key: ***: not an unencrypted PEM private key",
        ),
        (
            'auth = { type = "bearer", token = "env:FERRY_TEST_UNSET_TOKEN" }',
            "FERRY_TEST_UNSET_TOKEN is not set",
        ),
    ],
)
def test_bad_auth_and_tls_config_is_refused_with_its_path(extra: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        cfg.parse(SINK + extra)
    assert any(p.startswith("$.sinks.out") and problem in p for p in caught.value.problems), (
        caught.value.problems
    )
    assert "not a pem" not in str(caught.value)


async def test_a_cancelled_token_request_leaves_no_token_and_the_next_caller_asks_again(
    server: TokenServer,
) -> None:
    server.delay = 1.0
    auth = oauth(server)
    waiter_errors: list[str] = []

    async def waiter() -> None:
        try:
            await auth.headers()
        except RetryableDelivery as exc:
            waiter_errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(0.2) as scope:
            nursery.start_soon(waiter)
            await auth.headers()
    assert scope.cancelled_caught
    assert waiter_errors == ["oauth2 sinks.crm: token request interrupted"]
    server.delay = 0
    assert (await auth.headers())["authorization"].startswith("Bearer access-")
    assert server.count() == 2
