"""Webhook verification through the real listener, the real ingest batcher and a real SQLite store.

Each scheme is signed the way its provider signs — with the provider's own library where one
exists (stripe, slack_sdk, standardwebhooks, PyJWT) — and every refusal is checked to be a 401
that stored nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import slack_sdk.signature
import standardwebhooks
import stripe
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from actors.webhook.ingest import IngestBatcher
from actors.webhook.listener import WebhookListener
from daemon.assembly import fan_out, routes
from daemon.config.root import parse
from daemon.store.sqlite import Store
from daemon.telemetry import metrics

OLD, NEW = "old-secret-0123456789abcdef0123456789", "new-secret-fedcba9876543210fedcba9876"
WHSEC_OLD = "whsec_" + base64.b64encode(b"standard-webhooks-old-key-32byte").decode()
WHSEC_NEW = "whsec_" + base64.b64encode(b"standard-webhooks-new-key-32byte").decode()
BODY = b'{"id": 1, "amount": 42}'
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _pem(key: Any) -> str:
    return str(
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


Headers = dict[str, str]


@dataclass
class Request:
    """What a signer produces: the headers to send with `body`."""

    headers: Headers
    body: bytes = BODY


def _now() -> int:
    return int(time.time())


# -- signers: each provider's real algorithm ------------------------------------------------------


def github(secret: str, body: bytes = BODY, **_: Any) -> Request:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return Request({"X-Hub-Signature-256": f"sha256={digest}", "X-GitHub-Delivery": "d1"}, body)


def shopify(secret: str, body: bytes = BODY, **_: Any) -> Request:
    digest = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    return Request({"X-Shopify-Hmac-Sha256": digest}, body)


def stripe_(secret: str, body: bytes = BODY, at: int | None = None, **_: Any) -> Request:
    header = stripe.WebhookSignature.generate_signature_header(body.decode(), secret, timestamp=at or _now())
    return Request({"Stripe-Signature": header}, body)


def slack(secret: str, body: bytes = BODY, at: int | None = None, **_: Any) -> Request:
    stamp = str(at or _now())
    signature = slack_sdk.signature.SignatureVerifier(secret).generate_signature(timestamp=stamp, body=body)
    assert signature is not None
    return Request({"X-Slack-Signature": signature, "X-Slack-Request-Timestamp": stamp}, body)


def standard(
    secret: str, body: bytes = BODY, at: int | None = None, msg_id: str = "msg_1", **_: Any
) -> Request:
    when = datetime.fromtimestamp(at or _now(), tz=UTC)
    signature = standardwebhooks.Webhook(secret).sign(msg_id, when, body.decode())
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": signature,
    }
    return Request(headers, body)


def generic(secret: str, body: bytes = BODY, at: int | None = None, **_: Any) -> Request:
    stamp = str(at or _now())
    content = f"{stamp}.".encode() + body
    signature = base64.b64encode(hmac.new(secret.encode(), content, hashlib.sha512).digest()).decode()
    return Request({"X-Signature": f"v1={signature}", "X-Timestamp": stamp}, body)


def _jwt(claims: dict[str, Any], key: Any, algorithm: str, kid: str | None = None) -> Request:
    token = jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid} if kid else None)
    return Request({"Authorization": f"Bearer {token}"})


def jwt_hs(secret: str, at: int | None = None, jti: str = "j1", **_: Any) -> Request:
    now = at or _now()
    claims = {"iss": "sender", "aud": "ferry", "iat": now, "nbf": now, "exp": now + 60, "jti": jti}
    return _jwt(claims, secret, "HS256")


def basic(secret: str, **_: Any) -> Request:
    return Request({"Authorization": "Basic " + base64.b64encode(f"hooks:{secret}".encode()).decode()})


def api_key(secret: str, **_: Any) -> Request:
    return Request({"X-Api-Key": secret})


@dataclass(frozen=True)
class Scheme:
    name: str
    verify: str  # the TOML inline table, secrets referenced through env:
    sign: Callable[..., Request]
    old: str = OLD
    new: str = NEW
    timestamped: bool = True
    replayable: bool = True
    body_signed: bool = True


SCHEMES = [
    Scheme(
        "github", '{ scheme = "github", secrets = ["env:T_NEW", "env:T_OLD"] }', github, timestamped=False
    ),
    Scheme(
        "shopify", '{ scheme = "shopify", secrets = ["env:T_NEW", "env:T_OLD"] }', shopify, timestamped=False
    ),
    Scheme("stripe", '{ scheme = "stripe", secrets = ["env:T_NEW", "env:T_OLD"] }', stripe_),
    Scheme("slack", '{ scheme = "slack", secrets = ["env:T_NEW", "env:T_OLD"] }', slack),
    Scheme(
        "standard",
        '{ scheme = "standard-webhooks", secrets = ["env:SW_NEW", "env:SW_OLD"] }',
        standard,
        old=WHSEC_OLD,
        new=WHSEC_NEW,
    ),
    Scheme(
        "hmac",
        '{ scheme = "hmac", secrets = ["env:T_NEW", "env:T_OLD"], header = "X-Signature", prefix = "v1=", '
        'algorithm = "sha512", encoding = "base64", signed = "{timestamp}.{body}", '
        'timestamp_header = "X-Timestamp" }',
        generic,
    ),
    Scheme(
        "jwt",
        '{ scheme = "jwt", algorithms = ["HS256"], keys = ["env:T_NEW", "env:T_OLD"], audience = "ferry", '
        'issuer = "sender" }',
        jwt_hs,
        body_signed=False,
    ),
    Scheme(
        "basic",
        '{ scheme = "basic", username = "hooks", secrets = ["env:T_NEW", "env:T_OLD"] }',
        basic,
        timestamped=False,
        replayable=False,
        body_signed=False,
    ),
    Scheme(
        "api_key",
        '{ scheme = "api_key", secrets = ["env:T_NEW", "env:T_OLD"] }',
        api_key,
        timestamped=False,
        replayable=False,
        body_signed=False,
    ),
]
BY_NAME = {scheme.name: scheme for scheme in SCHEMES}


# -- the harness: config -> routes -> listener -> batcher -> store ---------------------------------


@dataclass
class Harness:
    url: str
    store: Store
    client: httpx.AsyncClient
    listener: WebhookListener

    async def post(self, source: str, request: Request, **extra: str) -> httpx.Response:
        headers = {"Content-Type": "application/json", **request.headers, **extra}
        return await self.client.post(f"{self.url}/hooks/{source}", content=request.body, headers=headers)

    async def stored(self) -> int:
        return int(
            await self.store.call(lambda conn: conn.execute("SELECT count(*) FROM events").fetchone()[0])
        )


def config_text(extra: str = "") -> str:
    sources = "\n".join(
        f'[sources.{scheme.name}]\ntype = "webhook"\nverify = {scheme.verify}\n' for scheme in SCHEMES
    )
    return f'[listener]\naddress = "127.0.0.1:0"\n{sources}\n[sources.open]\ntype = "webhook"\n{extra}'


@pytest.fixture
async def harness(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, nursery: trio.Nursery
) -> Harness:
    return await start(store, monkeypatch, tmp_path, nursery)


async def start(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    nursery: trio.Nursery,
    extra: str = "",
    clock: Callable[[], float] = time.time,
) -> Harness:
    monkeypatch.setenv("T_OLD", OLD)
    monkeypatch.setenv("T_NEW", NEW)
    monkeypatch.setenv("SW_OLD", WHSEC_OLD)
    monkeypatch.setenv("SW_NEW", WHSEC_NEW)
    config = parse(config_text(extra), base_dir=tmp_path)
    sinks, consumers = fan_out(config)
    batcher = IngestBatcher(store, sinks=sinks, consumers=consumers, dedup_window=3600)
    listener = WebhookListener(config.listener, routes(config), batcher, lambda: True, clock=clock)
    await nursery.start(batcher.run)
    bound = await nursery.start(listener.run)
    client = httpx.AsyncClient(timeout=10)
    return Harness(f"http://127.0.0.1:{bound[0][1]}", store, client, listener)


@pytest.fixture
def rejected() -> Iterator[Callable[[], list[tuple[str, str]]]]:
    """The `ferry.events.rejected` reasons recorded, as (source, reason)."""
    seen: list[tuple[str, str]] = []
    original = metrics.current()

    class Counting:
        def add(self, amount: int, attributes: dict[str, str]) -> None:
            seen.append((attributes["source"], attributes["reason"]))

    class Patched(type(original)):  # type: ignore[misc]
        pass

    patched = object.__new__(Patched)
    patched.__dict__.update(original.__dict__)
    patched.events_rejected = Counting()
    metrics.install(patched)
    yield lambda: seen
    metrics.install(original)


def _ids(schemes: list[Scheme]) -> list[str]:
    return [scheme.name for scheme in schemes]


# -- the cases --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids(SCHEMES))
async def test_a_validly_signed_request_is_stored_with_either_secret(
    harness: Harness, scheme: Scheme
) -> None:
    first = await harness.post(scheme.name, scheme.sign(scheme.new))
    assert first.status_code == 202, first.text
    rotated = scheme.sign(scheme.old, body=b'{"id": 2}', at=_now() - 1, jti="j2", msg_id="msg_2")
    second = await harness.post(scheme.name, rotated)
    assert second.status_code == 202, second.text
    assert await harness.stored() == 2


@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids(SCHEMES))
async def test_a_wrong_secret_is_401_and_stores_nothing(
    harness: Harness, scheme: Scheme, rejected: Callable[[], list[tuple[str, str]]]
) -> None:
    wrong = "whsec_" + base64.b64encode(b"x" * 32).decode() if scheme.name == "standard" else "wrong-" + OLD
    answer = await harness.post(scheme.name, scheme.sign(wrong))
    assert answer.status_code == 401
    assert answer.json()["reason"] in {"signature_mismatch", "credentials_mismatch"}
    assert OLD not in answer.text
    assert NEW not in answer.text
    assert await harness.stored() == 0
    assert rejected() == [(scheme.name, answer.json()["reason"])]


@pytest.mark.parametrize(
    "scheme", [s for s in SCHEMES if s.body_signed], ids=_ids([s for s in SCHEMES if s.body_signed])
)
async def test_a_tampered_body_is_401_and_stores_nothing(harness: Harness, scheme: Scheme) -> None:
    request = scheme.sign(scheme.new)
    request.body = request.body.replace(b"42", b"43")
    answer = await harness.post(scheme.name, request)
    assert answer.status_code == 401
    assert answer.json() == {"error": "signature does not match", "reason": "signature_mismatch"}
    assert await harness.stored() == 0


TIMESTAMPED = [s for s in SCHEMES if s.timestamped]


@pytest.mark.parametrize("scheme", TIMESTAMPED, ids=_ids(TIMESTAMPED))
@pytest.mark.parametrize("offset", [-600, 600], ids=["stale", "future"])
async def test_a_timestamp_outside_the_tolerance_is_401_and_stores_nothing(
    harness: Harness, scheme: Scheme, offset: int
) -> None:
    answer = await harness.post(scheme.name, scheme.sign(scheme.new, at=_now() + offset))
    assert answer.status_code == 401
    if scheme.name == "jwt":  # a token from the future is not valid yet; one from the past has expired
        assert answer.json()["reason"] == ("token_expired" if offset < 0 else "token_invalid")
    else:
        assert answer.json()["reason"] == ("timestamp_stale" if offset < 0 else "timestamp_future")
    assert await harness.stored() == 0


SIGNED_AT = [s for s in TIMESTAMPED if s.name != "jwt"]


@pytest.mark.parametrize("scheme", SIGNED_AT, ids=_ids(SIGNED_AT))
async def test_timestamps_are_judged_on_the_listeners_clock(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, nursery: trio.Nursery, scheme: Scheme
) -> None:
    """The listener reads its injected wall clock: on one set to November 2023, a request signed
    then passes and one signed now is from the future."""
    harness = await start(store, monkeypatch, tmp_path, nursery, clock=lambda: 1_700_000_030.0)
    then = await harness.post(scheme.name, scheme.sign(scheme.new, at=1_700_000_000))
    assert then.status_code == 202, then.text
    now = await harness.post(scheme.name, scheme.sign(scheme.new, body=b'{"id": 2}', msg_id="msg_2"))
    assert now.status_code == 401
    assert now.json()["reason"] == "timestamp_future"
    assert await harness.stored() == 1


REPLAYABLE = [s for s in SCHEMES if s.replayable]


@pytest.mark.parametrize("scheme", REPLAYABLE, ids=_ids(REPLAYABLE))
async def test_a_replayed_request_is_401_and_stored_once(
    harness: Harness, scheme: Scheme, rejected: Callable[[], list[tuple[str, str]]]
) -> None:
    request = scheme.sign(scheme.new)
    assert (await harness.post(scheme.name, request)).status_code == 202
    again = await harness.post(scheme.name, request, **{"Idempotency-Key": "a-fresh-key"})
    assert again.status_code == 401
    assert again.json() == {"error": "request already received (replay)", "reason": "replayed"}
    assert await harness.stored() == 1
    assert rejected() == [(scheme.name, "replayed")]


async def test_a_senders_retry_with_its_idempotency_key_is_a_duplicate_not_a_replay(harness: Harness) -> None:
    request = standard(WHSEC_NEW)
    first = await harness.post("standard", request, **{"Idempotency-Key": "delivery-1"})
    retry = await harness.post("standard", request, **{"Idempotency-Key": "delivery-1"})
    assert first.status_code == 202
    assert (retry.status_code, retry.json()) == (200, {"id": first.json()["id"], "duplicate": True})
    assert await harness.stored() == 1


async def test_concurrent_copies_of_one_request_store_it_once(harness: Harness) -> None:
    request = stripe_(NEW)
    answers: list[int] = []

    async def send() -> None:
        answers.append((await harness.post("stripe", request)).status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(send)
    assert sorted(answers) == [202] + [401] * 7
    assert await harness.stored() == 1


@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids(SCHEMES))
async def test_a_missing_header_is_401_and_stores_nothing(harness: Harness, scheme: Scheme) -> None:
    request = scheme.sign(scheme.new)
    for name in list(request.headers):
        if name.lower() not in {"x-github-delivery"}:
            stripped = Request({k: v for k, v in request.headers.items() if k != name}, request.body)
            answer = await harness.post(scheme.name, stripped)
            assert answer.status_code == 401, (name, answer.text)
            assert answer.json()["reason"].endswith("_missing"), (name, answer.json())
    assert await harness.stored() == 0


MALFORMED: dict[str, list[Headers]] = {
    "github": [{"X-Hub-Signature-256": "sha1=abc"}, {"X-Hub-Signature-256": "sha256=not-hex"}],
    "shopify": [{"X-Shopify-Hmac-Sha256": "%%%not base64%%%"}],
    "stripe": [
        {"Stripe-Signature": "garbage"},
        {"Stripe-Signature": f"t={_now()}"},
        {"Stripe-Signature": "v1=00ff"},
        {"Stripe-Signature": f"t=yesterday,v1={'0' * 64}"},
    ],
    "slack": [
        {"X-Slack-Signature": "v1=00", "X-Slack-Request-Timestamp": str(_now())},
        {"X-Slack-Signature": "v0=" + "0" * 64, "X-Slack-Request-Timestamp": "-5"},
    ],
    "standard": [
        {"webhook-id": "m", "webhook-timestamp": str(_now()), "webhook-signature": "v1 abc"},
        {"webhook-id": "m", "webhook-timestamp": str(_now()), "webhook-signature": "v2,abcd"},
        {"webhook-id": "m", "webhook-timestamp": str(_now()), "webhook-signature": "v1,***"},
    ],
    "hmac": [{"X-Signature": "sha512=abc", "X-Timestamp": str(_now())}],
    "jwt": [
        {"Authorization": "Bearer not.a.jwt"},
        {"Authorization": "Token abc"},
        {"Authorization": "Bearer"},
    ],
    "basic": [{"Authorization": "Bearer abc"}],
    "api_key": [],
}


@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids(SCHEMES))
async def test_a_malformed_header_is_401_and_stores_nothing(harness: Harness, scheme: Scheme) -> None:
    for headers in MALFORMED[scheme.name]:
        answer = await harness.post(scheme.name, Request(headers))
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.json()["reason"].endswith("_malformed"), (headers, answer.json())
    assert await harness.stored() == 0


async def test_an_unverified_source_is_untouched_and_a_verified_one_gets_a_challenge(
    harness: Harness,
) -> None:
    assert (await harness.post("open", Request({}))).status_code == 202
    basic_answer = await harness.post("basic", Request({}))
    assert basic_answer.headers["www-authenticate"] == 'Basic realm="ferry"'
    jwt_answer = await harness.post("jwt", Request({}))
    assert jwt_answer.headers["www-authenticate"] == 'Bearer realm="ferry"'


async def test_header_only_schemes_refuse_before_the_body_and_signatures_before_json(
    harness: Harness,
) -> None:
    bad_json = Request(github(NEW, body=b"{not json").headers, b"{not json")
    assert (await harness.post("github", bad_json)).status_code == 400  # signed, so parsed: then 400
    unsigned_bad_json = Request({"X-Hub-Signature-256": "sha256=" + "0" * 64}, b"{not json")
    assert (await harness.post("github", unsigned_bad_json)).status_code == 401  # not parsed at all
    answer = await harness.post("api_key", Request({"X-Api-Key": "nope"}), **{"Content-Type": "text/plain"})
    assert answer.status_code == 401  # credentials are judged before the content type


def test_github_documented_test_vector() -> None:
    """docs.github.com: secret "It's a Secret to Everybody", payload "Hello, World!"."""
    request = github("It's a Secret to Everybody", body=b"Hello, World!")
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert request.headers["X-Hub-Signature-256"] == expected


# -- JWT with public keys and a JWKS file ------------------------------------------------------------


async def test_jwt_with_rs256_es256_keys_and_a_jwks_file(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, nursery: trio.Nursery
) -> None:
    (tmp_path / "rsa.pem").write_text(_pem(RSA_KEY))
    (tmp_path / "ec.pem").write_text(_pem(EC_KEY))
    jwks = {"keys": [json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key())) | {"kid": "r1"}]}
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    extra = """
[sources.pem]
type = "webhook"
verify = { scheme = "jwt", algorithms = ["RS256", "ES256"], keys = ["file:rsa.pem", "file:ec.pem"] }
[sources.set]
type = "webhook"
verify = { scheme = "jwt", algorithms = ["RS256"], jwks_file = "jwks.json", audience = "ferry" }
"""
    harness = await start(store, monkeypatch, tmp_path, nursery, extra)
    exp = _now() + 60
    assert (await harness.post("pem", _jwt({"exp": exp}, RSA_KEY, "RS256"))).status_code == 202
    assert (await harness.post("pem", _jwt({"exp": exp}, EC_KEY, "ES256"))).status_code == 202
    assert (
        await harness.post("set", _jwt({"exp": exp, "aud": "ferry"}, RSA_KEY, "RS256", "r1"))
    ).status_code == 202
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = await harness.post("set", _jwt({"exp": exp, "aud": "ferry"}, other, "RS256", "r1"))
    assert forged.json()["reason"] == "credentials_mismatch"
    wrong_aud = await harness.post("set", _jwt({"exp": exp, "aud": "other"}, RSA_KEY, "RS256", "r1"))
    assert wrong_aud.json() == {"error": "token audience not accepted", "reason": "token_invalid"}
    no_exp = await harness.post("pem", _jwt({"sub": "x"}, RSA_KEY, "RS256"))
    assert no_exp.json() == {"error": "token lacks the 'exp' claim", "reason": "token_invalid"}
    # "alg": "none" and an HS256 token signed with the public key as secret are both refused
    # PyJWT annotates `key` without None, yet "none" requires None (NoneAlgorithm.prepare_key)
    unsigned = jwt.encode({"exp": exp}, None, algorithm="none")  # type: ignore[arg-type]
    assert (await harness.post("pem", Request({"Authorization": f"Bearer {unsigned}"}))).status_code == 401
    confused = jwt.api_jws.PyJWS()
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).rstrip(b"=")
    mac = hmac.new(_pem(RSA_KEY).encode(), header + b"." + payload, hashlib.sha256).digest()
    token = (header + b"." + payload + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()
    assert confused is not None
    assert (await harness.post("pem", Request({"Authorization": f"Bearer {token}"}))).status_code == 401
    assert await harness.stored() == 3
