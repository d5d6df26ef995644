"""Outbound auth and TLS with the real daemon: a counting OAuth2 token server, an API that only
accepts its tokens, a sink server that demands client certificates, and kill -9."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.certs import Pki
from tests.fake_oauth import TokenServer
from tests.fakes import HTTP, Daemon, FakeReceiver, ctl, ctl_json, write_config

CLIENT_SECRET = "s3cret-client-value"
QUIET = "[telemetry]\nmetrics = false\n"  # no exporter to wait for at shutdown

LIFETIME = 4.0
"""Seconds the tokens issued after the revocation live: with `refresh_before = "2s"`, a refresh
is 2 s ahead of the expiry, far more than a loaded machine delays a request."""


@pytest.fixture
def tokens() -> Iterator[TokenServer]:
    server = TokenServer(client_secret=CLIENT_SECRET).start()
    yield server
    server.stop()


@pytest.fixture
def api(tokens: TokenServer) -> Iterator[FakeReceiver]:
    receiver = FakeReceiver(tokens.api).start()
    yield receiver
    receiver.stop()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(body: str, env: dict[str, str] | None = None) -> Daemon:
        config = write_config(tmp_path, QUIET + body)
        daemon = Daemon(config, tmp_path / "ferry.log", env=env or {}).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def post(daemon: Daemon, n: int) -> None:
    response = HTTP.post(f"{daemon.url}/hooks/in", json={"n": n})
    assert response.status_code == 202, response.text


def wait(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


OAUTH = """
[control]
socket = "{socket}"

[sources.in]
type = "webhook"

[sinks.crm]
type = "http"
inputs = ["in"]
url = "{api}/contacts"
concurrency = 64
retry = {{ max_attempts = 20, initial_backoff = "50ms", max_backoff = "200ms" }}

[sinks.crm.auth]
type = "oauth2"
token_url = "{token_url}"
client_id = "ferry-client"
client_secret = "env:FERRY_TEST_CLIENT_SECRET"
refresh_before = "{refresh_before}"
"""


def test_oauth2_one_token_for_fifty_concurrent_deliveries_early_refresh_and_the_401_path(
    run: Callable[..., Daemon], tokens: TokenServer, api: FakeReceiver, sock_dir: Path
) -> None:
    daemon = run(
        OAUTH.format(socket=sock_dir / "f.sock", api=api.url, token_url=tokens.url, refresh_before="2s"),
        env={"FERRY_TEST_CLIENT_SECRET": CLIENT_SECRET},
    )
    config = daemon.config_path
    # 50 deliveries all due at once: the sink is paused while they arrive, then resumed.
    assert ctl(config, "pause", "crm").returncode == 0
    for n in range(50):
        post(daemon, n)
    tokens.delay = 0.3  # the token request is in flight while all 50 want a token
    assert ctl(config, "resume", "crm").returncode == 0
    wait(lambda: len(api.snapshot()) >= 50)
    assert tokens.count() == 1
    assert {json.loads(r.body)["n"] for r in api.snapshot()} == set(range(50))
    assert not tokens.refused
    tokens.delay = 0

    # The API stops accepting the token: one 401, one refresh, one retry, delivered.
    tokens.expires_in = LIFETIME  # from here on: refreshed 2 s (refresh_before) before it expires
    tokens.revoke()
    post(daemon, 100)
    wait(
        lambda: any(
            json.loads(r.body)["n"] == 100 and tokens.valid(r.headers["authorization"])
            for r in api.snapshot()
        )
    )
    assert tokens.count() == 2
    assert len(tokens.refused) == 1
    refused_ids = [r.headers["idempotency-key"] for r in api.snapshot() if json.loads(r.body)["n"] == 100]
    assert len(refused_ids) == 2
    assert len(set(refused_ids)) == 1  # the retry is the same delivery

    # Steady traffic until two more tokens were needed: refreshed before expiry, never a 401.
    n = 200
    deadline = time.monotonic() + 60  # a hang guard: it takes about two refresh periods, 4 s
    while tokens.count() < 4:
        assert time.monotonic() < deadline, f"{tokens.count()} tokens after 60 s of traffic"
        post(daemon, n)
        n += 1
        time.sleep(0.1)  # the traffic's pace
    wait(lambda: {json.loads(r.body)["n"] for r in api.snapshot()} >= set(range(200, n)))
    assert len(tokens.refused) == 1
    # Each token was asked for while the previous one was still valid, about 2 s before it expired
    # (a lazy client asks only once one has expired).
    pairs = list(zip(tokens.issued[1:], tokens.issued[2:], strict=False))
    assert len(pairs) >= 2
    assert all(later.at < earlier.at + LIFETIME for earlier, later in pairs), [(a.at, b.at) for a, b in pairs]

    # An API that refuses every token: one refresh, one retry, then a dead letter like any 401.
    tokens.deny = True
    post(daemon, 999)
    wait(lambda: ctl_json(config, "dlq", "list")["total"] >= 1)
    letters = ctl_json(config, "dlq", "list")["items"]
    assert letters[0]["last_status"] == 401
    tries = [r.headers["authorization"] for r in api.snapshot() if json.loads(r.body)["n"] == 999]
    assert len(tries) == 2
    assert tries[0] != tries[1]  # the retry carried a freshly requested token


ROTATING = """
[store.encryption]
key = "env:FERRY_TEST_STORE_KEY"

[sources.in]
type = "webhook"

[sinks.crm]
type = "http"
inputs = ["in"]
url = "{api}/contacts"
retry = {{ max_attempts = 20, initial_backoff = "50ms", max_backoff = "200ms" }}

[sinks.crm.auth]
type = "oauth2"
grant = "refresh_token"
token_url = "{token_url}"
client_id = "ferry-client"
client_secret = "env:FERRY_TEST_CLIENT_SECRET"
refresh_token = "env:FERRY_TEST_REFRESH"
"""


def test_a_rotated_refresh_token_survives_kill_9_and_is_encrypted_in_the_store(
    run: Callable[..., Daemon], tokens: TokenServer, api: FakeReceiver, tmp_path: Path
) -> None:
    tokens.rotate = True
    tokens.refresh_tokens.add("refresh-original-0")
    env = {
        "FERRY_TEST_CLIENT_SECRET": CLIENT_SECRET,
        "FERRY_TEST_REFRESH": "refresh-original-0",
        "FERRY_TEST_STORE_KEY": "q" * 43 + "=",
    }
    daemon = run(ROTATING.format(api=api.url, token_url=tokens.url), env=env)
    post(daemon, 1)
    wait(lambda: len(api.snapshot()) == 1)
    assert tokens.requests[0]["refresh_token"] == "refresh-original-0"
    (rotated,) = tokens.refresh_tokens  # the server retired the original at once
    daemon.kill9()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "state").glob("ferry.db*"))
    assert rotated.encode() not in raw  # kept, but encrypted like the payloads

    daemon = run(ROTATING.format(api=api.url, token_url=tokens.url), env=env)
    post(daemon, 2)
    # (event 1 may go out again: kill -9 can come before its outcome was recorded)
    wait(lambda: any(json.loads(r.body)["n"] == 2 for r in api.snapshot()))
    assert tokens.requests[1]["refresh_token"] == rotated
    assert tokens.count() == 2
    assert not tokens.refused


MTLS = """
[sources.in]
type = "webhook"

[sinks.mutual]
type = "http"
inputs = ["in"]
url = "{url}/a"
tls = {{ ca = "pki/ca.pem", cert = "pki/client.pem", key = "file:pki/client.key" }}
retry = {{ max_attempts = 50, initial_backoff = "100ms", max_backoff = "200ms" }}

[sinks.mutual_httpx]
type = "http"
inputs = ["in"]
client = "httpx"
url = "{url}/d"
tls = {{ ca = "pki/ca.pem", cert = "pki/client.pem", key = "file:pki/client.key" }}
retry = {{ max_attempts = 50, initial_backoff = "100ms", max_backoff = "200ms" }}

[sinks.nocert]
type = "http"
inputs = ["in"]
url = "{url}/b"
tls = {{ ca = "pki/ca.pem" }}
retry = {{ max_attempts = 50, initial_backoff = "100ms", max_backoff = "200ms" }}

[sinks.systemca]
type = "http"
inputs = ["in"]
client = "httpx"
url = "{url}/c"
retry = {{ max_attempts = 50, initial_backoff = "100ms", max_backoff = "200ms" }}
"""


def test_mtls_client_certificate_and_custom_ca(run: Callable[..., Daemon], tmp_path: Path) -> None:
    pki = Pki.create(tmp_path / "pki")
    server = FakeReceiver().start(ssl_context=pki.server_context())
    try:
        daemon = run(MTLS.format(url=server.url))
        post(daemon, 1)
        wait(lambda: len(server.snapshot()) == 2)
        assert sorted(r.path for r in server.snapshot()) == ["/a", "/d"]  # lean and httpx clients
        failures: dict[str, str] = {}

        def both_failed() -> bool:
            for line in daemon.logs():
                sink, error = line.get("sink"), line.get("error")
                if sink in ("nocert", "systemca") and error:
                    failures[sink] = error
            return len(failures) == 2

        wait(both_failed)
        # The server ends the handshake of a client without a certificate (TLS 1.3 says so after
        # the client's Finished, so the client may see a reset rather than the alert).
        assert "127.0.0.1" in failures["nocert"]
        assert "certificate" in failures["systemca"]
        assert "rejected" in failures["systemca"] or "verify" in failures["systemca"]
        assert sorted(r.path for r in server.snapshot()) == ["/a", "/d"]
    finally:
        server.stop()


ROTATE = """
[control]
socket = "{socket}"

[sources.in]
type = "webhook"

[sinks.crm]
type = "http"
inputs = ["in"]
url = "{url}/x"
auth = {{ type = "bearer", token = "file:token.txt" }}
"""


def test_a_rotated_static_secret_is_used_after_reload(
    run: Callable[..., Daemon], tmp_path: Path, sock_dir: Path
) -> None:
    receiver = FakeReceiver().start()
    try:
        (tmp_path / "token.txt").write_text("token-one\n")
        daemon = run(ROTATE.format(socket=sock_dir / "f.sock", url=receiver.url))
        post(daemon, 1)
        wait(lambda: len(receiver.snapshot()) == 1)
        (tmp_path / "token.txt").write_text("token-two\n")
        done = ctl(daemon.config_path, "reload")
        assert done.returncode == 0, done.stderr
        assert "token-two" not in done.stdout + done.stderr
        post(daemon, 2)
        wait(lambda: len(receiver.snapshot()) == 2)
        assert [r.headers["authorization"] for r in receiver.snapshot()] == [
            "Bearer token-one",
            "Bearer token-two",
        ]
    finally:
        receiver.stop()
