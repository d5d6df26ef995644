"""Secrets grep: the real daemon runs every outbound path that takes a secret — each auth type, a
client certificate key, the store key — with receivers and token endpoints that fail and *echo
back* what they were sent; then no secret value (nor any credential derived from one: a Basic
pair, an access token, a rotated refresh token, a signed JWT) may appear in a log line, an
exported span or metric, `ferry ctl` output, or an error text."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.certs import Pki
from tests.fake_oauth import TokenServer
from tests.fakes import ROOT, Daemon, FakeReceiver, Received, Reply, ctl, write_config
from tests.otlp import OtlpReceiver

SECRETS = {
    "FT_API_KEY_HEADER": "sk-header-9f8e7d6c5b4a",
    "FT_API_KEY_QUERY": "sk-query-1a2b3c4d5e6f",
    "FT_BASIC_PASSWORD": "basic-pass-77aa88bb",
    "FT_BEARER": "bearer-tok-3344556677",
    "FT_CLIENT_SECRET": "client-secret-ab12cd34",
    "FT_BAD_CLIENT_SECRET": "client-secret-wrong-ee55ff66",
    "FT_REFRESH": "refresh-seed-0099887766",
    "FT_STORE_KEY": base64.b64encode(b"k" * 32).decode(),
    "FT_WEBHOOK_SECRET": "whsec-github-55cc66dd",
    "FT_WEBHOOK_KEY": "inbound-key-88ee99ff",
    "FT_POLL_KEY": "poll-key-0a1b2c3d4e",
    "FT_POLL_TOKEN": "poll-bearer-5f6a7b8c",
}


def _echo(request: Received) -> Reply:
    """Every path fails, quoting the credentials it was sent (as careless APIs do)."""
    echo = json.dumps(
        {
            "authorization": request.headers.get("authorization"),
            "x-api-key": request.headers.get("x-api-key"),
            "path": request.path,
        }
    ).encode()
    status = {
        "/hk": 500,
        "/q": 422,
        "/basic": 401,
        "/bearer": 400,
        "/cc": 401,
        "/jwt": 403,
        "/poll": 401,
    }.get(urlsplit(request.path).path, 200)
    return status, {"content-type": "application/json"}, echo


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[dict[str, object]]:
    pki = Pki.create(tmp_path / "pki")
    made = {
        "api": FakeReceiver(_echo).start(),
        "tls": FakeReceiver(_echo).start(ssl_context=pki.server_context()),
        "cc": TokenServer(client_secret=SECRETS["FT_CLIENT_SECRET"], prefix="at-cc-71f3e-").start(),
        "rt": TokenServer(
            client_secret=SECRETS["FT_CLIENT_SECRET"], prefix="at-rt-52a9c-", rotate=True
        ).start(),
        "bad": TokenServer(client_secret=SECRETS["FT_CLIENT_SECRET"]).start(),
        "otlp": OtlpReceiver().start(),
    }
    made["rt"].refresh_tokens.add(SECRETS["FT_REFRESH"])  # type: ignore[attr-defined]
    # A token endpoint that refuses, quoting the secret it was sent in its error description.
    made["bad"].fail_with = (  # type: ignore[attr-defined]
        400,
        {},
        json.dumps(
            {"error": "invalid_client", "error_description": SECRETS["FT_BAD_CLIENT_SECRET"]}
        ).encode(),
    )
    yield made
    for server in made.values():
        server.stop()  # type: ignore[attr-defined]


URL_PASSWORD = "url-pass-12ab34cd"  # written into a sink's URL: a secret all the same

SINK = """
[sinks.{name}]
type = "http"
inputs = ["in"]
url = "{url}"
retry = {{ max_attempts = 2, initial_backoff = "50ms", max_backoff = "50ms" }}
{extra}
"""


def _config(servers: dict[str, object], otlp: OtlpReceiver, socket: Path, jwt_key: Path) -> str:
    api, tls = servers["api"].url, servers["tls"].url  # type: ignore[attr-defined]
    cc, rt, bad = (servers[k].url for k in ("cc", "rt", "bad"))  # type: ignore[attr-defined]
    sinks = [
        ("hk", f"{api}/hk", 'auth = { type = "api_key", key = "env:FT_API_KEY_HEADER" }'),
        ("q", f"{api}/q", 'auth = { type = "api_key", key = "env:FT_API_KEY_QUERY", query = "api_key" }'),
        (
            "basic",
            f"{api}/basic",
            'auth = { type = "basic", username = "u", password = "env:FT_BASIC_PASSWORD" }',
        ),
        ("bearer", f"{api}/bearer", 'auth = { type = "bearer", token = "env:FT_BEARER" }'),
        ("userinfo", api.replace("://", f"://ferry:{URL_PASSWORD}@") + "/userinfo", ""),
        (
            "cc",
            f"{api}/cc",
            f'[sinks.cc.auth]\ntype = "oauth2"\ntoken_url = "{cc}"\nclient_id = "ferry-client"\n'
            'client_secret = "env:FT_CLIENT_SECRET"',
        ),
        (
            "rt",
            f"{api}/rt",
            f'[sinks.rt.auth]\ntype = "oauth2"\ngrant = "refresh_token"\ntoken_url = "{rt}"\n'
            'client_id = "ferry-client"\nclient_secret = "env:FT_CLIENT_SECRET"\n'
            'refresh_token = "env:FT_REFRESH"',
        ),
        (
            "bad",
            f"{api}/bad",
            f'[sinks.bad.auth]\ntype = "oauth2"\ntoken_url = "{bad}"\nclient_id = "ferry-client"\n'
            'client_secret = "env:FT_BAD_CLIENT_SECRET"\nclient_auth = "body"',
        ),
        (
            "jwt",
            f"{api}/jwt",
            f'auth = {{ type = "jwt_bearer", issuer = "ferry", private_key = "file:{jwt_key}" }}',
        ),
        (
            "mtls",
            f"{tls}/mtls",
            'tls = { ca = "pki/ca.pem", cert = "pki/client.pem", key = "file:pki/client.key" }',
        ),
    ]
    body = f"""
[store.encryption]
key = "env:FT_STORE_KEY"

[control]
socket = "{socket}"

[telemetry]
traces = true
sample_ratio = 1.0
metrics = true
metrics_interval = "200ms"
endpoint = "{otlp.url}"

[sources.in]
type = "webhook"

[sources.gh]
type = "webhook"
verify = {{ scheme = "github", secrets = ["env:FT_WEBHOOK_SECRET"] }}

[sources.keyed]
type = "webhook"
verify = {{ scheme = "api_key", secrets = ["env:FT_WEBHOOK_KEY"] }}

[sources.pollq]
type = "poll"
method = "POST"
url = "{api}/poll?page=1"
key = ".id"
interval = "100ms"
auth = {{ type = "api_key", key = "env:FT_POLL_KEY", query = "api_key" }}

[sources.pollb]
type = "poll"
method = "POST"
url = "{api}/poll?page=2"
key = ".id"
interval = "100ms"
auth = {{ type = "bearer", token = "env:FT_POLL_TOKEN" }}
"""
    return body + "".join(SINK.format(name=name, url=url, extra=extra) for name, url, extra in sinks)


def test_no_secret_reaches_logs_spans_ctl_or_errors(
    tmp_path: Path, sock_dir: Path, servers: dict[str, object]
) -> None:
    otlp: OtlpReceiver = servers["otlp"]  # type: ignore[assignment]
    key = rsa.generate_private_key(65537, 2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    (tmp_path / "jwt.key").write_text(pem)
    config = write_config(tmp_path, _config(servers, otlp, sock_dir / "f.sock", tmp_path / "jwt.key"))
    env = dict(SECRETS)
    daemon = Daemon(config, tmp_path / "ferry.log", env=env).start()
    outputs: list[str] = []
    try:
        for n in range(3):
            response = httpx.post(f"{daemon.url}/hooks/in", json={"n": n}, timeout=10)
            assert response.status_code == 202
        # Inbound verification, passing and failing (a wrong signature, a replay, a wrong key).
        body = b'{"action":"opened"}'
        signature = hmac.new(SECRETS["FT_WEBHOOK_SECRET"].encode(), body, hashlib.sha256).hexdigest()
        for sign, expected in ((signature, 202), ("0" * 64, 401), (signature, 401)):
            response = httpx.post(
                f"{daemon.url}/hooks/gh",
                content=body,
                headers={"content-type": "application/json", "x-hub-signature-256": f"sha256={sign}"},
                timeout=10,
            )
            assert response.status_code == expected, response.text
        for api_key, expected in ((SECRETS["FT_WEBHOOK_KEY"], 202), ("inbound-key-wrong", 401)):
            headers = {"x-api-key": api_key}
            response = httpx.post(f"{daemon.url}/hooks/keyed", json={}, headers=headers, timeout=10)
            assert response.status_code == expected, response.text
        # Wait until every failing sink has dead-lettered all three (two attempts each), and the
        # mTLS sink delivered its three: nothing makes it faster than the others' two attempts.
        deadline = time.monotonic() + 30
        while True:
            status = json.loads(ctl(config, "--json", "status").stdout)
            stages = status["stages"]
            failing = ("hk", "q", "basic", "bearer", "cc", "bad", "jwt")
            polls = [line for line in daemon.logs() if line.get("msg") == "poll failed"]
            polled = {line.get("source") for line in polls if (line.get("failures") or 0) >= 2}
            if (
                all(stages[s]["dead"] == 3 for s in failing)
                and stages["rt"]["delivered"] == 3
                and stages["mtls"]["delivered"] == 3
                and polled >= {"pollq", "pollb"}
            ):
                break
            assert time.monotonic() < deadline, stages
            time.sleep(0.2)
        letters = json.loads(ctl(config, "--json", "dlq", "list", "--limit", "100").stdout)["items"]
        assert len(letters) == 21
        for command in (("status",), ("stats",), ("dlq", "list"), ("audit",), ("reload",)):
            for json_flag in ((), ("--json",)):
                done = ctl(config, *json_flag, *command)
                outputs.append(done.stdout + done.stderr)
        one_per_sink = {letter["sink"]: letter for letter in letters}.values()
        for letter in one_per_sink:
            done = ctl(config, "dlq", "show", letter["id"])
            outputs.append(done.stdout + done.stderr)
            assert done.returncode == 0
        check = subprocess.run(
            [sys.executable, "-m", "daemon.cli", "check", "-c", str(config)],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        outputs.append(check.stdout + check.stderr)
        otlp.wait_spans(lambda spans: any(s.name == "sink deliver" for s in spans))
    finally:
        daemon.stop()

    # What the daemon sent as credentials counts too: access tokens, Basic pairs, signed JWTs.
    sent: set[str] = {*SECRETS.values(), URL_PASSWORD}
    for server in (servers["api"], servers["tls"]):
        for request in server.snapshot():  # type: ignore[attr-defined]
            for name in ("authorization", "x-api-key"):
                value = request.headers.get(name)
                if value:
                    sent.add(value.partition(" ")[2] or value)
            sent.update(v for k, v in parse_qsl(urlsplit(request.path).query) if k == "api_key")
    for name in ("cc", "rt"):
        tokens: TokenServer = servers[name]  # type: ignore[assignment]
        sent.update(item.token for item in tokens.issued)
        sent.update(tokens.refresh_tokens)
    sent.add(pem.splitlines()[5])  # one line of the JWT signing key
    sent.add((tmp_path / "pki" / "client.key").read_text().splitlines()[2])  # of the TLS client key
    assert any(s.startswith("at-cc-") for s in sent)
    assert any(s.startswith("at-rt-") and "rotated" in s for s in sent)
    assert any(s.count(".") == 2 and len(s) > 100 for s in sent)  # a JWT

    logs = (tmp_path / "ferry.log").read_text()
    exported = b"".join(otlp.raw)
    assert exported
    places = {"log": logs, "ctl": "\n".join(outputs), "otlp": exported.decode("latin-1")}
    leaks = [(secret, where) for secret in sorted(sent) for where, text in places.items() if secret in text]
    assert not leaks, leaks
    # The error texts were there to leak: the receivers' echoes are stored and shown, scrubbed.
    assert '"authorization": "***"' in places["ctl"]
    assert '"x-api-key": "***"' in places["ctl"]
    assert "api_key=***" in places["ctl"]
