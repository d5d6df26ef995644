"""The test helpers' own promises (tests/fakes.py)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx

from tests.fakes import Daemon, FakeReceiver, Received, Reply, ok, write_config

SINK = """
[sources.demo]
type = "webhook"

[sinks.out]
type = "file"
inputs = ["demo"]
path = "out.jsonl"
"""


def test_a_daemon_from_write_config_binds_a_port_the_kernel_picks_and_reports_it(tmp_path: Path) -> None:
    """No port is chosen before the daemon binds it, so no other test (xdist) can take it first."""
    config = write_config(tmp_path, SINK)
    assert 'address = "127.0.0.1:0"' in config.read_text()
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    try:
        host, _, port = daemon.address.rpartition(":")
        assert (host, port != "0") == ("127.0.0.1", True)
        assert httpx.get(f"{daemon.url}/healthz").status_code == 200
    finally:
        daemon.stop()


HELD = 0.3


def test_a_request_is_stamped_when_it_arrived_not_when_it_was_read() -> None:
    """A stalled test process (a loaded machine) reads requests late; their times must not bunch."""
    entered, gate = threading.Event(), threading.Event()

    def first_waits(request: Received) -> Reply:
        if request.path == "/1":
            entered.set()
            gate.wait(10)
        return ok(request)

    receiver = FakeReceiver(first_waits).start()
    try:
        with socket.create_connection(("127.0.0.1", receiver.port)) as client:
            client.sendall(b"POST /1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            assert entered.wait(10)
            before = time.time()
            client.sendall(b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            time.sleep(HELD)  # the stimulus: the handler reads the second request this much later
            released = time.time()
            gate.set()  # only now can the handler read the second request
            seen = receiver.wait_for(lambda requests: len(requests) == 2, timeout=10)
    finally:
        receiver.stop()
    assert [r.path for r in seen] == ["/1", "/2"]
    # The kernel stamps the segment when loopback delivers it, which may come a little after
    # sendall returns (a softirq), but long before the read the test held back for HELD seconds.
    assert before <= seen[1].at < released - HELD / 2
