"""The test helpers' own promises (tests/fakes.py)."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.fakes import Daemon, write_config

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
