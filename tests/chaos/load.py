"""What the chaos scenarios share: their scale, a cheap HTTP load generator, the daemon's RSS.

`FERRY_CHAOS=full` (set by `make chaos`) runs each scenario at full size; otherwise a short
version runs in `make test`. Every loop is bounded in count and time, and all traffic goes to
127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import trio

FULL = os.environ.get("FERRY_CHAOS", "short") == "full"

_HEAD = (
    b"POST /hooks/demo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n%s\r\n%s"
)


def request(body: bytes, key: str | None = None) -> bytes:
    """A whole webhook POST, with an `Idempotency-Key` if `key` is given."""
    extra = b"Idempotency-Key: %s\r\n" % key.encode() if key else b""
    return _HEAD % (len(body), extra, body)


async def exchange(stream: trio.SocketStream, data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send one request on a keep-alive connection and read its answer.

    A raw client costs a fraction of httpx's CPU, so on two cores the daemon, not the load
    generator, is what a scenario measures. Raises `trio.BrokenResourceError` (or EOFError) if
    the connection breaks before a whole answer arrived.
    """
    await stream.send_all(data)
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError("connection closed before the answer")
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {
        name.strip().lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines)
    }
    length = int(headers[b"content-length"])
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError("connection closed mid-answer")
        body += chunk
    return int(status_line.split()[1]), headers, body


BROKEN = (OSError, EOFError, trio.BrokenResourceError, trio.ClosedResourceError)


async def post_until_acked(
    address: Callable[[], tuple[str, int]],
    bodies: Callable[[int], bytes],
    count: int,
    *,
    concurrency: int = 32,
    keyed: bool = True,
    deadline_s: float = 600.0,
) -> dict[int, str]:
    """POST events 0..count-1 like a sender that retries until acknowledged; return n -> event id.

    A broken connection, a refused one (the daemon is down) or a 503 is retried after a short
    pause, with the same idempotency key `evt-N` when `keyed`. Any other answer fails.
    """
    acked: dict[int, str] = {}
    todo = list(reversed(range(count)))
    decode = msgspec.json.Decoder().decode

    async def sender() -> None:
        stream: trio.SocketStream | None = None
        while todo:
            n = todo.pop()
            data = request(bodies(n), f"evt-{n}" if keyed else None)
            while True:
                try:
                    if stream is None:
                        stream = await trio.open_tcp_stream(*address())
                    status, _, answer = await exchange(stream, data)
                except BROKEN:
                    if stream is not None:
                        await trio.aclose_forcefully(stream)
                    stream = None
                    await trio.sleep(0.02)
                    continue
                if status in (200, 202):
                    acked[n] = decode(answer)["id"]
                    break
                assert status == 503, (status, answer)
                await trio.sleep(0.05)
        if stream is not None:
            await trio.aclose_forcefully(stream)

    with trio.fail_after(deadline_s):
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(sender)
    return acked


def cpu_s(pid: int) -> float:
    """The CPU time (user + system) process `pid` has used so far, in seconds: unlike a wall-clock
    time, it does not grow when other processes take the cores."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class RssSampler:
    """Samples a process's RSS every `interval` seconds on a thread, until stopped."""

    pid: Callable[[], int]
    interval: float = 0.2
    samples: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):  # between a kill and the restart
                self.samples.append(rss_mb(self.pid()))

    @property
    def peak(self) -> float:
        return max(self.samples, default=0.0)
