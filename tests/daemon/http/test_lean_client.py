"""LeanClient against a receiver that answers with scripted bytes: hostile, broken, or just unusual.

The well-behaved cases, for both clients, are in test_http_client.py; the codec's rules with
bytes alone in test_wire.py. Here: what the client does with the connection each time.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from daemon.errors import DeliveryTimeout, PermanentDelivery, RetryableDelivery
from daemon.http.client import LeanClient
from daemon.http.wire import MAX_HEAD
from tests.daemon.http.serving import serve

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# What the receiver does with one request: bytes to send (then keep the connection), or a
# coroutine function given the stream and the request's head (it may close the stream).
Script = bytes | Callable[[trio.SocketStream, bytes], Awaitable[None]]


@dataclass
class Scripted:
    """Answers each request with the next script (then `OK`); counts connections and requests."""

    url: str = ""
    scripts: list[Script] = field(default_factory=list)
    connections: int = 0
    requests: list[tuple[int, bytes]] = field(default_factory=list)  # (connection, head)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        number, buffer = self.connections, b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head)
                need = int(length[1]) if length else 0
                while len(buffer) < need:
                    buffer += await stream.receive_some(65536)
                buffer = buffer[need:]
                self.requests.append((number, head))
                script = self.scripts.pop(0) if self.scripts else OK
                if isinstance(script, bytes):
                    await stream.send_all(script)
                else:
                    await script(stream, head)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


@pytest.fixture
async def scripted(nursery: trio.Nursery) -> Scripted:
    fake = Scripted()
    fake.url = f"http://127.0.0.1:{await serve(nursery, fake.handle)}/in"
    return fake


async def post(client: LeanClient, url: str, key: str = "k", timeout: float = 5.0) -> tuple[int, bytes]:
    response = await client.request(
        "POST", url, headers=[("Idempotency-Key", key)], body=b"{}", timeout=timeout
    )
    return response.status, response.body


async def test_bytes_after_an_answer_close_its_connection(scripted: Scripted) -> None:
    scripted.scripts.append(OK + b"HTTP/1.1 500 Smuggled\r\nContent-Length: 0\r\n\r\n")
    client = LeanClient()
    assert await post(client, scripted.url) == (200, b"ok")
    assert await post(client, scripted.url) == (200, b"ok")  # not the stray 500
    assert [number for number, _ in scripted.requests] == [1, 2]
    await client.aclose()


async def test_a_body_that_runs_to_the_close_is_read_and_not_reused(scripted: Scripted) -> None:
    async def until_close(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 202 Accepted\r\n\r\npart one, ")
        await stream.send_all(b"part two")
        await stream.aclose()

    scripted.scripts.append(until_close)
    client = LeanClient()
    assert await post(client, scripted.url) == (202, b"part one, part two")
    assert await post(client, scripted.url) == (200, b"ok")
    assert scripted.connections == 2
    await client.aclose()


async def test_informational_answers_before_the_real_one(scripted: Scripted) -> None:
    scripted.scripts.append(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + OK
    )
    client = LeanClient()
    assert await post(client, scripted.url) == (200, b"ok")
    assert await post(client, scripted.url) == (200, b"ok")
    assert scripted.connections == 1
    await client.aclose()


async def test_a_head_request_reads_no_body_and_keeps_the_connection(scripted: Scripted) -> None:
    scripted.scripts.append(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    client = LeanClient()
    response = await client.request("HEAD", scripted.url, headers=[], body=b"", timeout=5)
    assert (response.status, response.body, response.header("content-length")) == (200, b"", "1000")
    assert await post(client, scripted.url) == (200, b"ok")
    assert scripted.connections == 1
    await client.aclose()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n", "response head over"),
        (b"HTTP/1.1 200 OK\r\nX-Bad\r\n\r\n", "bad header line"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            "conflicting Content-Length",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer-Encoding"),
        (b"HTTP/1.1 OK\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
    ],
)
async def test_a_hostile_answer_is_retryable_and_its_connection_closed(
    scripted: Scripted, answer: bytes, reason: str
) -> None:
    scripted.scripts.append(answer)
    client = LeanClient()
    with pytest.raises(RetryableDelivery, match=rf"^bad HTTP response from 127\.0\.0\.1:\d+: .*{reason}"):
        await post(client, scripted.url)
    assert await post(client, scripted.url) == (200, b"ok")
    assert scripted.connections == 2
    await client.aclose()


@pytest.mark.parametrize("reset", [False, True])
async def test_a_connection_lost_in_the_middle_of_the_body(scripted: Scripted, reset: bool) -> None:
    async def half(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        if reset:  # RST instead of FIN
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    client = LeanClient()
    await post(client, scripted.url)  # a pooled connection: a failure after bytes is not "stale"
    scripted.scripts.append(half)
    expected = (
        "reset by|before the end of the response body" if reset else "before the end of the response body"
    )
    with pytest.raises(RetryableDelivery, match=expected):
        await post(client, scripted.url)
    assert len(scripted.requests) == 2  # not re-sent: the receiver had begun to answer
    await client.aclose()


async def test_a_trickling_body_times_out_within_the_deadline(scripted: Scripted) -> None:
    async def trickle(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        while True:
            await stream.send_all(b"a")
            await trio.sleep(0.05)

    scripted.scripts.append(trickle)
    client = LeanClient()
    start = trio.current_time()
    with pytest.raises(DeliveryTimeout, match=r"^timed out after 0\.4s$"):
        await post(client, scripted.url, timeout=0.4)
    assert 0.4 <= trio.current_time() - start < 1.0
    assert repr(client) == "<LeanClient [active: 0 | idle: 0 connections to 0 hosts]>"
    await client.aclose()


async def test_a_non_ascii_header_value_is_permanent_and_nothing_is_sent(scripted: Scripted) -> None:
    client = LeanClient()
    with pytest.raises(PermanentDelivery, match="illegal value of header 'X-Name'"):
        await client.request("POST", scripted.url, headers=[("X-Name", "Zo\u00eb")], body=b"{}", timeout=5)
    assert scripted.connections == 0
    await client.aclose()


async def test_concurrent_requests_each_get_their_own_answer_and_idle_stays_capped(
    scripted: Scripted,
) -> None:
    async def echo_key(stream: trio.SocketStream, head: bytes) -> None:
        match = re.search(rb"(?i)\r\nidempotency-key: ([^\r]+)", head)
        assert match is not None
        await trio.sleep(0.001 * (hash(match[1]) % 5))  # answers finish out of order
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(match[1]), match[1]))

    scripted.scripts.extend([echo_key] * 400)
    client = LeanClient(max_idle_per_host=4)
    answers: dict[str, tuple[int, bytes]] = {}

    async def worker(number: int) -> None:
        for i in range(25):
            key = f"w{number}-{i}"
            answers[key] = await post(client, scripted.url, key)

    async with trio.open_nursery() as nursery:
        for number in range(16):
            nursery.start_soon(worker, number)
    assert answers == {key: (200, key.encode()) for key in answers}
    assert len(answers) == 400
    assert 16 <= scripted.connections < 400  # reused, and only 4 kept between bursts
    assert repr(client) == "<LeanClient [active: 0 | idle: 4 connections to 1 host]>"
    await client.aclose()


async def test_a_body_larger_than_the_socket_buffers_waits_for_room_and_arrives_whole(
    nursery: trio.Nursery,
) -> None:
    body = bytes(range(256)) * (128 * 1024)  # 32 MiB: more than loopback's send and receive buffers
    release, received = trio.Event(), []

    async def handle(stream: trio.SocketStream) -> None:
        await release.wait()  # nothing is read until the client waits for room to write
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive_some(65536)
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head)
        assert length is not None
        parts = [buffer]
        size = len(buffer)
        while size < int(length[1]):
            parts.append(await stream.receive_some(1 << 20))
            size += len(parts[-1])
        received.append(b"".join(parts))
        await stream.send_all(OK)

    url = f"http://127.0.0.1:{await serve(nursery, handle)}/in"
    client = LeanClient()
    answers = []

    async def send() -> None:
        answers.append(await client.request("POST", url, headers=[], body=body, timeout=30))

    async with trio.open_nursery() as inner:
        inner.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()  # the client is waiting for a full buffer to drain
        assert not answers
        release.set()
    assert [answer.status for answer in answers] == [200]
    assert received == [body]
    await client.aclose()
