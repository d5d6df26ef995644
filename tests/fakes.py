"""Real things for tests: a receiving HTTP server that records and fails on cue, and the daemon as a process.

Both run for real on 127.0.0.1; nothing here is a mock.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent

HTTP = httpx.Client(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))
"""For the tests' one-off requests to a daemon: a new connection for each, as `httpx.post` makes,
without `httpx.post`'s new client each time, whose set-up (its TLS context) costs ~45 ms of CPU."""


@dataclass
class Received:
    """One request the fake receiver got."""

    at: float
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Reply = tuple[int, dict[str, str], bytes]
R = TypeVar("R")
Responder = Callable[[Received], Reply]


def ok(_: Received) -> Reply:
    return 200, {}, b'{"ok":true}'


@dataclass
class FakeReceiver:
    """A threaded HTTP/1.1 server recording every request; `responder` decides each answer."""

    responder: Responder = ok
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    connections: int = 0

    def start(self, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> Self:
        """Serve on 127.0.0.1:`port` (0: any free port); with `ssl_context`, over TLS."""
        receiver = self

        class Handler(QuietHandler):
            def setup(self) -> None:
                super().setup()
                with receiver.lock:
                    receiver.connections += 1

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Received(
                    self.arrived,
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                status, headers, reply = receiver.responder(request)
                if status < 0:  # hang up without answering
                    self.close_connection = True
                    return
                with receiver.lock:
                    receiver.requests.append(request)
                self.reply(status, headers, reply)

            do_GET = do_POST = do_PUT = do_PATCH = _handle

        self.server = serve(Handler, port, ssl_context)
        self.port = self.server.server_address[1]
        return self

    @property
    def url(self) -> str:
        scheme = "https" if isinstance(self.server.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.requests)

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 60.0) -> list[Received]:
        """Wait until `predicate(requests)` holds; fail with what was seen at the deadline."""
        return wait_requests(self.snapshot, predicate, timeout)


T = TypeVar("T")


def until(
    read: Callable[[], T], done: Callable[[T], bool], timeout: float = 30.0, interval: float = 0.05
) -> T:
    """Read until `done(value)` holds; fail at the deadline with the last value read."""
    deadline = time.monotonic() + timeout
    while not done(value := read()):
        assert time.monotonic() < deadline, f"not reached within {timeout}s: {value}"
        time.sleep(interval)
    return value


def wait_requests(
    snapshot: Callable[[], list[R]], predicate: Callable[[list[R]], bool], timeout: float
) -> list[R]:
    """A fake server's `wait_for`: until `predicate(snapshot())` holds, failing with how many came."""
    deadline = time.monotonic() + timeout
    while True:
        seen = snapshot()
        if predicate(seen):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; {len(seen)} request(s) received")
        time.sleep(0.02)


SO_TIMESTAMPNS = 35  # Linux (asm-generic and x86); also the type of its ancillary data
_TIMESPEC = struct.Struct("@qq")


def _keep_stamping() -> socket.socket | None:
    """A socket holding SO_TIMESTAMPNS for the life of the process. Linux turns receive
    timestamps on lazily (a deferred static key) when the first socket asks, and off when the last
    one closes; a packet that arrives while they are off is stamped when it is read. Held from
    import, every fake server's first request carries its real arrival time."""
    held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        held.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        held.close()
        return None
    return held


_STAMPING = _keep_stamping()


class QuietHandler(BaseHTTPRequestHandler):
    """The base of the fake servers' handlers: HTTP/1.1 keep-alive, no access log, no Nagle.

    `arrived` is when the request being handled reached this host (`time.time()` scale): the
    kernel's timestamp of its first bytes, so a stall of the test process (a loaded machine, the
    GIL) does not bunch requests that came apart; the time it was read when the kernel's is not
    to be had (TLS, or a pipelined request already read ahead)."""

    protocol_version = "HTTP/1.1"
    arrived: float = 0.0

    def setup(self) -> None:
        super().setup()
        # Head and body go out in two writes; Nagle + delayed ACK would add 40 ms to each answer
        # (a fake receiver that took 40 ms a request made the suite's delivery tests that slow).
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._stamped = not isinstance(self.request, ssl.SSLSocket)
        if self._stamped:
            try:
                self.request.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            except OSError:  # another architecture's number: the time it is read, as before
                self._stamped = False

    def handle_one_request(self) -> None:
        self.arrived = self._arrival()
        super().handle_one_request()

    def _arrival(self) -> float:
        """Wait for the next request's first byte without taking it; the kernel's time of it."""
        sock: socket.socket = self.request
        space = socket.CMSG_SPACE(_TIMESPEC.size)
        if not self._stamped:
            return time.time()
        try:
            try:
                _, ancillary, _, _ = sock.recvmsg(1, space, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                # Nothing in the socket: wait for it, unless the next request was read ahead
                # with the last one (pipelined): then it is already here, and its time is now.
                sock.setblocking(False)
                try:
                    buffered = self.rfile.peek(1)  # type: ignore[attr-defined]
                finally:
                    sock.setblocking(True)
                if buffered:
                    return time.time()
                _, ancillary, _, _ = sock.recvmsg(1, space, socket.MSG_PEEK)
        except OSError:
            return time.time()  # the connection broke: reading the request says so
        for level, kind, data in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS):
                seconds, nanoseconds = _TIMESPEC.unpack(data[: _TIMESPEC.size])
                return float(seconds + nanoseconds / 1e9)
        return time.time()  # the end of the connection, or no stamp

    def reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        """Send one whole answer (a 304 without length or body)."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if status != 304:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if status != 304:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up (the daemon killed mid-request) is expected here


def serve(
    handler: type[BaseHTTPRequestHandler], port: int = 0, ssl_context: ssl.SSLContext | None = None
) -> ThreadingHTTPServer:
    """Serve `handler` on 127.0.0.1:`port` (0: any free port) from a daemon thread; with
    `ssl_context`, over TLS. Stop it with `shutdown()` then `server_close()`."""
    server = _Server(("127.0.0.1", port), handler)
    if ssl_context is not None:
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def free_port() -> int:
    """A port free a moment ago; another process may take it before it is used (the race xdist
    makes likely). Only for a port that must be known before a server starts, e.g. a sink URL
    that nothing listens on yet, or a listener that must keep its address across a restart;
    a listener otherwise binds `127.0.0.1:0` and the test reads the bound address back
    (`Daemon.address`, from the daemon's `ready` line)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Daemon:
    """`ferry run` as a real child process, with its JSON log lines captured."""

    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables (e.g. NOTIFY_SOCKET, WATCHDOG_USEC)."""
    launcher: list[str] = field(default_factory=list)
    """A command that execs its arguments, run in front of the daemon (e.g. a socket-activation shim)."""
    pass_fds: tuple[int, ...] = ()

    def start(self, timeout: float = 20.0) -> Daemon:
        self._log = self.log_path.open("ab")
        offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [*self.launcher, sys.executable, "-m", "daemon.cli", "run", "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            pass_fds=self.pass_fds,
        )
        ready = self.wait_log(lambda line: line.get("msg") == "ready", timeout=timeout, offset=offset)
        self.address = ready["listener"][0]
        return self

    def logs(self, offset: int = 0) -> list[dict[str, Any]]:
        lines = []
        with self.log_path.open("rb") as file:
            file.seek(offset)
            for raw in file:
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    lines.append({"raw": raw.decode("utf-8", "replace")})
        return lines

    def wait_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0, offset: int = 0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.logs(offset):
                if predicate(line):
                    return line
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.logs(offset)[-5:]}")
            time.sleep(0.02)
        raise AssertionError(f"log line not seen within {timeout}s: {self.logs(offset)[-5:]}")

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()


def write_config(directory: Path, body: str, *, port: int | None = None) -> Path:
    """A config file with a listener on 127.0.0.1 and the store under `directory`, plus `body`.

    The listener binds port 0 (the kernel picks a free one; `Daemon.start` reads it back) unless
    `port` is given: a test that restarts the daemon and keeps sending to one address gives it."""
    path = directory / "ferry.toml"
    path.write_text(
        f"""
[store]
path = "state/ferry.db"
retention = "1h"

[listener]
address = "127.0.0.1:{port if port is not None else 0}"

[supervisor]
shutdown_grace = "5s"
{body}
""",
        encoding="utf-8",
    )
    return path


def ctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`ferry ctl -c CONFIG ARGS…` as a real subprocess (no terminal on stdin)."""
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "ctl", "-c", str(config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


def ctl_json(config: Path, *args: str) -> Any:
    """`ferry ctl --json …`, which must succeed; its decoded answer."""
    done = ctl(config, "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
