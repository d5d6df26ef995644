"""A plain-TCP connection of the webhook listener, read on its socket's descriptor.

`trio.SocketStream.receive_some` wraps every read in a conflict detector and an error-translating
context manager, and after a read that did not have to wait it takes a trip through trio's
scheduler; `send_all` does the same after a write. Per webhook request that was a few per cent
of the listener's CPU. `PlainStream` reads the descriptor itself (`os.read`, non-blocking as
trio left it) and waits with `trio.lowlevel.wait_readable` only when nothing is there. A write
goes straight to the descriptor only when a read has waited since the previous write, so that
every request and its answer still pass at least one checkpoint (cancellation, a turn for the
other connections) however fast a client pipelines; otherwise, and for whatever does not fit
in the socket's buffer at once, it is the `SocketStream`'s `send_all`, as are `send_eof` and
`aclose`.

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
        self._waited = False  # a read waited since the last write: the next write need not yield

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        fd = self.stream.socket.fileno()  # -1 once closed (never a number reused by another socket)
        while True:
            try:
                return os.read(fd, max_bytes or CHUNK)
            except BlockingIOError:
                self._waited = True
                await trio.lowlevel.wait_readable(fd)
            except OSError as exc:
                raise _translated(exc) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._waited:
            self._waited = False
            try:
                sent = os.write(self.stream.socket.fileno(), data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise _translated(exc) from exc
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


def _translated(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """A socket error as `SocketStream` raises it."""
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("this connection was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")
