"""A test server for the HTTP client tests: `handler` per connection on 127.0.0.1, port 0."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import trio


async def serve(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    """Serve `handler` in `nursery` until it ends; the port the kernel bound."""
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])
