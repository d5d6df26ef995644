"""The store's files are private to the daemon's user, whatever the umask it was started with."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx

from tests.fakes import Daemon, write_config

CONFIG = """
[telemetry]
traces = false
metrics = false

[control]
socket = "{socket}"

[sources.demo]
type = "webhook"

[sinks.out]
type = "file"
inputs = ["demo"]
path = "out.jsonl"
"""


def test_a_fresh_daemon_with_umask_022_creates_the_database_wal_and_shm_0600(
    tmp_path: Path, sock_dir: Path
) -> None:
    config = write_config(tmp_path, CONFIG.format(socket=sock_dir / "ferry.sock"))
    umask_022 = ["sh", "-c", 'umask 022 && exec "$@"', "sh"]  # a shell's usual umask, outside systemd
    daemon = Daemon(config, tmp_path / "daemon.log", launcher=umask_022).start()
    try:
        assert httpx.post(f"{daemon.url}/hooks/demo", json={"n": 1}).status_code == 202
        state = tmp_path / "state"
        files = [state / "ferry.db", state / "ferry.db-wal", state / "ferry.db-shm"]
        modes = {file.name: stat.S_IMODE(file.stat().st_mode) for file in files}  # while running
    finally:
        daemon.stop()
    assert modes == {"ferry.db": 0o600, "ferry.db-wal": 0o600, "ferry.db-shm": 0o600}
