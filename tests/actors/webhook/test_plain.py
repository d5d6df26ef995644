"""PlainStream: the listener's plain-TCP reads on the descriptor behave as SocketStream's do."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from actors.webhook.plain import PlainStream


async def read_to_the_end(stream: PlainStream) -> None:
    while await stream.receive_some():
        pass


@pytest.fixture
async def pair(nursery: trio.Nursery) -> AsyncIterator[tuple[PlainStream, trio.SocketStream]]:
    """(the server side as a PlainStream, the client's SocketStream) of one TCP connection."""
    accepted: list[trio.SocketStream] = []
    ready = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        ready.set()
        await trio.sleep_forever()

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    await ready.wait()
    server = PlainStream(accepted[0])
    yield server, client
    await server.aclose()
    await client.aclose()


async def test_reads_what_is_there_and_waits_for_what_is_not(
    pair: tuple[PlainStream, trio.SocketStream],
) -> None:
    server, client = pair
    await client.send_all(b"POST / HTTP/1.1\r\n")
    await trio.testing.wait_all_tasks_blocked()
    assert await server.receive_some() == b"POST / HTTP/1.1\r\n"
    got: list[bytes] = []

    async def read() -> None:
        got.append(await server.receive_some(4))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [], "nothing there: it waits"
        await client.send_all(b"Host: x\r\n")
    assert got == [b"Host"]  # at most max_bytes
    assert await server.receive_some() == b": x\r\n"


async def test_a_wait_is_cancellable_and_the_end_reads_empty(
    pair: tuple[PlainStream, trio.SocketStream],
) -> None:
    server, client = pair
    with trio.move_on_after(0.05) as scope:
        await server.receive_some()
    assert scope.cancelled_caught
    await client.send_eof()
    assert await server.receive_some() == b""


async def test_a_reset_is_a_broken_stream_and_a_closed_one_is_closed(
    pair: tuple[PlainStream, trio.SocketStream],
) -> None:
    server, client = pair
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.send_all(b"x")
    await client.aclose()  # RST
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(trio.BrokenResourceError, match="reset"):
        await read_to_the_end(server)
    await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_some()


async def test_writes_and_half_close_are_the_socket_streams(
    pair: tuple[PlainStream, trio.SocketStream],
) -> None:
    server, client = pair
    await server.send_all(b"HTTP/1.1 202 Accepted\r\n\r\n")
    await server.wait_send_all_might_not_block()
    await server.send_eof()
    received = b""
    while chunk := await client.receive_some(1024):
        received += chunk
    assert received == b"HTTP/1.1 202 Accepted\r\n\r\n"


async def test_an_answer_larger_than_the_socket_buffer_arrives_whole_after_a_waited_read(
    pair: tuple[PlainStream, trio.SocketStream],
) -> None:
    server, client = pair
    answer = bytes(range(256)) * (128 * 1024)  # 32 MiB: the first write cannot take it all
    received = bytearray()

    async def read_request_then_answer() -> None:
        assert await server.receive_some() == b"GET / HTTP/1.1\r\n\r\n"  # waited: nothing was there
        await server.send_all(answer)

    with trio.fail_after(20):  # a lost remainder fails here instead of hanging
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_request_then_answer)
            await trio.testing.wait_all_tasks_blocked()
            await client.send_all(b"GET / HTTP/1.1\r\n\r\n")
            while len(received) < len(answer):
                received += await client.receive_some(1 << 20)
    assert received == answer


async def test_a_write_to_a_reset_connection_is_a_broken_stream(
    pair: tuple[PlainStream, trio.SocketStream],
) -> None:
    server, client = pair

    async def read() -> None:
        await server.receive_some()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        await client.send_all(b"x")
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.aclose()  # RST
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(trio.BrokenResourceError, match=r"reset|broken pipe"):
        await server.send_all(b"HTTP/1.1 202 Accepted\r\n\r\n")
