"""HTTPS on the listener: a certificate made in the test, real TLS clients, rotation without rebinding."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from opentelemetry.trace import Span

from actors.webhook.config import ListenerConfig
from actors.webhook.listener import WebhookListener, WebhookRoute
from actors.webhook.tls import server_context
from daemon.config.root import parse
from daemon.errors import ConfigError

JSON = {"Content-Type": "application/json"}


@dataclass
class Cert:
    cert: Path
    key: Path
    serial: int


def make_cert(folder: Path, name: str) -> Cert:
    """A self-signed certificate for 127.0.0.1 (its own CA), written as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ferry test {name}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = Cert(folder / f"{name}.crt", folder / f"{name}.key", cert.serial_number)
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


def tls_config(cert: Path, key: str, extra: str = "") -> ListenerConfig:
    head = '[listener]\naddress = "127.0.0.1:0"\nheader_timeout = "1s"\n'
    text = head + f'tls = {{ cert = "{cert}", key = "{key}"{extra} }}\n'
    return parse(text).listener


async def _ingest(
    source: str,
    body: bytes,
    dedup_key: str | None,
    traceparent: str | None,
    replay: object = None,
    *,
    parent: Span | None = None,
) -> tuple[str, bool]:
    return "evt-1", False


async def serve(nursery: trio.Nursery, config: ListenerConfig) -> tuple[WebhookListener, int]:
    listener = WebhookListener(
        config,
        {"/hooks/demo": WebhookRoute("demo", None)},
        _ingest,
        lambda: True,
        tls=server_context(config.tls),
    )
    bound = await nursery.start(listener.run)
    return listener, bound[0][1]


def client_context(*certs: Cert, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for cert in certs:
        context.load_verify_locations(cafile=str(cert.cert))
    if maximum is not None:
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
    return context


async def peer_serial(port: int, context: ssl.SSLContext) -> tuple[int, str]:
    """Handshake with the listener; the certificate serial it presented and the TLS version."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    await stream.do_handshake()
    der = stream.getpeercert(binary_form=True)
    version = stream.version()
    await stream.aclose()
    assert der is not None
    assert version is not None
    return x509.load_der_x509_certificate(der).serial_number, version


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_https_requests_are_served_over_tls_1_2_or_later(tmp_path: Path, nursery: trio.Nursery) -> None:
    first = make_cert(tmp_path, "first")
    _, port = await serve(nursery, tls_config(first.cert, f"file:{first.key}"))
    async with httpx.AsyncClient(verify=client_context(first)) as client:
        answer = await client.post(f"https://127.0.0.1:{port}/hooks/demo", content=b"{}", headers=JSON)
        health = await client.get(f"https://127.0.0.1:{port}/healthz")
    assert answer.status_code == 202
    assert answer.json() == {"id": "evt-1"}
    assert health.status_code == 200
    serial, version = await peer_serial(port, client_context(first))
    assert serial == first.serial
    assert version in {"TLSv1.2", "TLSv1.3"}
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
        await peer_serial(port, client_context(first, maximum=ssl.TLSVersion.TLSv1_1))


async def test_min_version_1_3_refuses_a_tls_1_2_client(tmp_path: Path, nursery: trio.Nursery) -> None:
    cert = make_cert(tmp_path, "only13")
    _, port = await serve(nursery, tls_config(cert.cert, f"file:{cert.key}", ', min_version = "1.3"'))
    assert (await peer_serial(port, client_context(cert)))[1] == "TLSv1.3"
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
        await peer_serial(port, client_context(cert, maximum=ssl.TLSVersion.TLSv1_2))


async def test_plain_http_and_silent_clients_on_the_tls_port_are_closed_and_serving_goes_on(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    cert = make_cert(tmp_path, "cert")
    listener, port = await serve(nursery, tls_config(cert.cert, f"file:{cert.key}"))
    plain = await trio.open_tcp_stream("127.0.0.1", port)
    await plain.send_all(b"POST /hooks/demo HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
    with trio.fail_after(5):
        while await plain.receive_some(1024):
            pass  # whatever TLS alert comes back, then EOF; never an HTTP answer in clear text
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(5):  # header_timeout = 1s bounds the handshake too
        while await silent.receive_some(1024):
            pass
    with trio.fail_after(5):
        while listener.connections:  # both closed by the server; its bookkeeping follows at once
            await trio.sleep(0.01)
    assert (await peer_serial(port, client_context(cert)))[0] == cert.serial


async def test_retls_serves_a_new_certificate_to_new_connections_without_rebinding(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    first, second = make_cert(tmp_path, "first"), make_cert(tmp_path, "second")
    listener, port = await serve(nursery, tls_config(first.cert, f"file:{first.key}"))
    trusting_both = client_context(first, second)
    assert (await peer_serial(port, trusting_both))[0] == first.serial
    kept = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=trusting_both)
    await kept.do_handshake()
    listener.retls(server_context(tls_config(second.cert, f"file:{second.key}").tls))
    assert (await peer_serial(port, trusting_both))[0] == second.serial
    await kept.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")  # the open connection goes on
    assert (await kept.receive_some(1024)).startswith(b"HTTP/1.1 200")
    await kept.aclose()


def test_the_key_may_come_from_the_environment_and_never_appears_in_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, other = make_cert(tmp_path, "cert"), make_cert(tmp_path, "other")
    monkeypatch.setenv("LISTENER_KEY", cert.key.read_text())
    assert server_context(tls_config(cert.cert, "env:LISTENER_KEY").tls) is not None
    key_text = other.key.read_text()
    monkeypatch.setenv("LISTENER_KEY", key_text)
    with pytest.raises(ConfigError) as caught:
        server_context(tls_config(cert.cert, "env:LISTENER_KEY").tls)
    (problem,) = caught.value.problems
    assert problem.startswith(
        f"$.listener.tls: cannot use certificate {cert.cert} with key env:LISTENER_KEY: "
    )
    assert "BEGIN" not in problem
    assert key_text.splitlines()[1] not in problem


def test_unusable_certificates_are_config_errors(tmp_path: Path) -> None:
    cert = make_cert(tmp_path, "cert")
    (tmp_path / "garbage.crt").write_text("not a certificate")
    key = f"file:{cert.key}"
    cases = {
        f'tls = {{ cert = "missing.crt", key = "{key}" }}': "$.listener.tls.cert: cannot read ",
        f'tls = {{ cert = "garbage.crt", key = "{key}" }}': "$.listener.tls: cannot use certificate ",
        f'tls = {{ cert = "{cert.cert}", key = "file:nokey" }}': "$.listener.tls.key: file:nokey: ",
        f'tls = {{ cert = "{cert.cert}", key = "{key}", min_version = "1.1" }}': "$.listener.tls.min_version",
    }
    for tls, expected in cases.items():
        with pytest.raises(ConfigError) as caught:
            parse(f'[listener]\naddress = "127.0.0.1:0"\n{tls}\n', base_dir=tmp_path)
        assert caught.value.problems[0].startswith(expected), (tls, caught.value.problems)


def test_a_reload_may_change_listener_tls_but_nothing_else_in_listener(tmp_path: Path) -> None:
    from daemon.reload import frozen_changes

    first, second = make_cert(tmp_path, "first"), make_cert(tmp_path, "second")
    base = '[listener]\naddress = "127.0.0.1:0"\n'
    old = parse(base + f'tls = {{ cert = "{first.cert}", key = "file:{first.key}" }}\n')
    new = parse(base + f'tls = {{ cert = "{second.cert}", key = "file:{second.key}" }}\n')
    moved = parse(
        '[listener]\naddress = "127.0.0.1:1"\n'
        + f'tls = {{ cert = "{second.cert}", key = "file:{second.key}" }}\n'
    )
    assert frozen_changes(old, new) == []
    assert frozen_changes(old, moved) == ["[listener] changed: restart ferry to apply"]
