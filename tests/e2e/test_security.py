"""Inbound security through the real daemon process: verified webhooks, secret rotation, HTTPS.

Signatures are GitHub's and Stripe's real algorithms (stripe's own library signs); refused
requests are checked against the SQLite file itself; replay protection must survive `kill -9`.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import sqlite3
import ssl
from pathlib import Path

import httpx
import pytest
import stripe
from cryptography import x509

from tests.actors.webhook.test_webhook_tls import client_context, make_cert
from tests.fakes import Daemon, ctl, write_config

GITHUB_SECRET, ROTATED = "gh-secret-0123456789abcdef", "gh-rotated-fedcba9876543210"
STRIPE_SECRET = "whsec_stripe-e2e-0123456789"
BODY = b'{"action": "opened", "number": 7}'

CONFIG = """
[telemetry]
traces = false
metrics = false

[control]
socket = "{socket}"

[sources.github]
type = "webhook"
verify = {{ scheme = "github", secrets = ["file:github.secret"] }}

[sources.stripe]
type = "webhook"
verify = {{ scheme = "stripe", secrets = ["env:FERRY_E2E_STRIPE"] }}

[sinks.out]
type = "file"
inputs = ["github", "stripe"]
path = "out.jsonl"
{extra}"""


def github_headers(secret: str, body: bytes = BODY) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={digest}"}


def events(folder: Path) -> int:
    conn = sqlite3.connect(folder / "state" / "ferry.db")
    try:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    finally:
        conn.close()


def start(tmp_path: Path, sock_dir: Path, extra: str = "", port: int | None = None) -> Daemon:
    config = write_config(tmp_path, CONFIG.format(socket=sock_dir / "ferry.sock", extra=extra), port=port)
    return Daemon(config, tmp_path / "ferry.log", env={"FERRY_E2E_STRIPE": STRIPE_SECRET}).start()


def test_verified_webhooks_store_only_what_is_signed_and_replays_stay_refused_after_kill_9(
    tmp_path: Path, sock_dir: Path
) -> None:
    (tmp_path / "github.secret").write_text(GITHUB_SECRET + "\n")
    daemon = start(tmp_path, sock_dir)
    try:
        signed = github_headers(GITHUB_SECRET)
        assert httpx.post(f"{daemon.url}/hooks/github", content=BODY, headers=signed).status_code == 202
        wrong = httpx.post(f"{daemon.url}/hooks/github", content=BODY, headers=github_headers("nope"))
        assert (wrong.status_code, wrong.json()["reason"]) == (401, "signature_mismatch")
        stripe_header = stripe.WebhookSignature.generate_signature_header(BODY.decode(), STRIPE_SECRET)
        stripe_headers = {"Content-Type": "application/json", "Stripe-Signature": stripe_header}
        assert (
            httpx.post(f"{daemon.url}/hooks/stripe", content=BODY, headers=stripe_headers).status_code == 202
        )
        replay = httpx.post(f"{daemon.url}/hooks/stripe", content=BODY, headers=stripe_headers)
        assert (replay.status_code, replay.json()["reason"]) == (401, "replayed")
        port = int(daemon.address.rsplit(":", 1)[1])
        daemon.kill9()
        assert events(tmp_path) == 2

        daemon = start(tmp_path, sock_dir, port=port)
        for path, headers in (("github", signed), ("stripe", stripe_headers)):
            again = httpx.post(f"{daemon.url}/hooks/{path}", content=BODY, headers=headers)
            assert (again.status_code, again.json()["reason"]) == (401, "replayed"), path
        assert events(tmp_path) == 2
    finally:
        daemon.stop()
    log = (tmp_path / "ferry.log").read_text()
    assert GITHUB_SECRET not in log
    assert STRIPE_SECRET not in log


def test_a_rotated_secret_file_applies_on_reload(tmp_path: Path, sock_dir: Path) -> None:
    secret = tmp_path / "github.secret"
    secret.write_text(GITHUB_SECRET)
    daemon = start(tmp_path, sock_dir)
    try:
        url = f"{daemon.url}/hooks/github"
        assert (
            httpx.post(
                url, content=b'{"n": 1}', headers=github_headers(GITHUB_SECRET, b'{"n": 1}')
            ).status_code
            == 202
        )
        secret.write_text(ROTATED)
        done = ctl(daemon.config_path, "reload")
        assert done.returncode == 0, done.stderr
        assert "changed  sources.github" in done.stdout
        old = httpx.post(url, content=b'{"n": 2}', headers=github_headers(GITHUB_SECRET, b'{"n": 2}'))
        assert old.status_code == 401
        new = httpx.post(url, content=b'{"n": 3}', headers=github_headers(ROTATED, b'{"n": 3}'))
        assert new.status_code == 202
        secret.unlink()
        refused = ctl(daemon.config_path, "reload")
        assert refused.returncode != 0
        assert (
            "$.sources.github.verify.secrets[0]: file:github.secret: cannot read"
            in refused.stdout + refused.stderr
        )
        still = httpx.post(url, content=b'{"n": 4}', headers=github_headers(ROTATED, b'{"n": 4}'))
        assert still.status_code == 202  # a refused reload changed nothing
    finally:
        daemon.stop()
    log = (tmp_path / "ferry.log").read_text()
    assert GITHUB_SECRET not in log
    assert ROTATED not in log


def _serial(port: int, context: ssl.SSLContext) -> int:
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_https_listener_rotates_its_certificate_on_reload(tmp_path: Path, sock_dir: Path) -> None:
    (tmp_path / "github.secret").write_text(GITHUB_SECRET)
    first, second = make_cert(tmp_path, "first"), make_cert(tmp_path, "second")
    (tmp_path / "listener.crt").write_bytes(first.cert.read_bytes())
    (tmp_path / "listener.key").write_bytes(first.key.read_bytes())
    config = write_config(tmp_path, CONFIG.format(socket=sock_dir / "ferry.sock", extra=""))
    text = config.read_text().replace(
        "\n[supervisor]", '\ntls = { cert = "listener.crt", key = "file:listener.key" }\n\n[supervisor]', 1
    )
    config.write_text(text)
    daemon = Daemon(config, tmp_path / "ferry.log", env={"FERRY_E2E_STRIPE": STRIPE_SECRET}).start()
    try:
        port = int(daemon.address.rsplit(":", 1)[1])
        both = client_context(first, second)
        answer = httpx.post(
            f"https://127.0.0.1:{port}/hooks/github",
            content=BODY,
            headers=github_headers(GITHUB_SECRET),
            verify=both,
        )
        assert answer.status_code == 202
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            httpx.get(f"http://127.0.0.1:{port}/healthz")  # plain HTTP on the TLS port gets no answer
        assert _serial(port, both) == first.serial

        (tmp_path / "listener.crt").write_bytes(second.cert.read_bytes())
        (tmp_path / "listener.key").write_bytes(second.key.read_bytes())
        done = ctl(daemon.config_path, "reload")
        assert done.returncode == 0, done.stderr
        assert _serial(port, both) == second.serial

        (tmp_path / "listener.key").write_bytes(first.key.read_bytes())  # no longer matches the certificate
        refused = ctl(daemon.config_path, "reload")
        assert refused.returncode != 0
        assert "$.listener.tls: cannot use certificate" in refused.stdout + refused.stderr
        assert _serial(port, both) == second.serial  # the last good certificate is still served
    finally:
        daemon.stop()
    assert "BEGIN PRIVATE KEY" not in (tmp_path / "ferry.log").read_text()
