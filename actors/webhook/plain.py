"""A plain-TCP connection of the webhook listener, read on its socket's descriptor.

`trio.SocketStream.receive_some` wraps every read in a conflict detector and an error-translating
context manager, and after a read that did not have to wait it takes a trip through trio's
scheduler; per webhook request that was a few per cent of the listener's CPU. `PlainStream`
reads the descriptor itself (`os.read`, non-blocking as trio left it) and waits with
`trio.lowlevel.wait_readable` only when nothing is there; everything else (`send_all`,
`send_eof`, `aclose`) is the `SocketStream`'s. Every request still passes a checkpoint: its
answer's `send_all` is one, and so is any wait for bytes.

Errors are the stream's: a descriptor closed under the read is `trio.ClosedResourceError`,
any other socket error `trio.BrokenResourceError` (as `SocketStream` translates them).
"""

from __future__ import annotations

import errno
import os
from typing import final

import trio

__all__ = ["PlainStream"]

CHUNK = 65536


@final
class PlainStream(trio.abc.HalfCloseableStream):
    """`stream` (plain TCP) with reads on its descriptor; see the module docstring."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        fd = self.stream.socket.fileno()  # -1 once closed (never a number reused by another socket)
        while True:
            try:
                return os.read(fd, max_bytes or CHUNK)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError("this connection was closed") from None
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()
