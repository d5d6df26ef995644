"""The real daemon under the kernel's equivalent of ferry.service's `MemoryDenyWriteExecute=yes`.

`MemoryDenyWriteExecute=yes` refuses mappings that are (or become) writable and executable; the
kernel's `PR_SET_MDWE` (Linux 6.3+) enforces the same rule on a process and its exec, so this
runs without systemd, on every test run. The unit's own sandbox, seccomp filter
(`SystemCallFilter=`) included, is enforced by a real systemd on the installed package in
tests/debian/test_package.py (`step_the_units_sandbox_is_enforced_for_real`); the seccomp
emulation that stood here (and skipped without python3-seccomp) gave way to it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes import Daemon, FakeReceiver, write_config

# Sets MDWE on itself, then execs argv[1:]: the daemon inherits it.
SANDBOX = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""

PIPELINE = """
[sources.demo]
type = "webhook"

[transforms.shape]
inputs = ["demo"]
map = '{{id: .id, name: (.first + " " + .last)}}'

[sinks.crm]
type = "http"
inputs = ["shape"]
url = "{url}/contacts"
retry = {{ max_attempts = 20, initial_backoff = "50ms", max_backoff = "500ms" }}
"""

LAUNCHER = [sys.executable, "-c", SANDBOX]


@pytest.fixture(scope="module")
def mdwe() -> None:
    probe = subprocess.run([*LAUNCHER, sys.executable, "-c", ""], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"kernel without PR_SET_MDWE: {probe.stderr.decode().strip()}")


@pytest.fixture
def receiver() -> Iterator[FakeReceiver]:
    fake = FakeReceiver().start()
    yield fake
    fake.stop()


def test_write_execute_mappings_are_refused_in_the_sandbox(mdwe: None) -> None:
    probe = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    result = subprocess.run([*LAUNCHER, sys.executable, "-c", probe], capture_output=True, check=False)
    assert result.returncode != 0
    assert b"PermissionError" in result.stderr


def test_daemon_with_jq_and_sqlite_runs_without_write_execute_memory(
    mdwe: None, tmp_path: Path, receiver: FakeReceiver
) -> None:
    config = write_config(tmp_path, PIPELINE.format(url=receiver.url))
    daemon = Daemon(config, tmp_path / "ferry.log", launcher=LAUNCHER)
    try:
        daemon.start()
        for n in range(20):
            body = {"id": n, "first": "Ada", "last": f"Lovelace-{n}"}
            assert httpx.post(f"{daemon.url}/hooks/demo", json=body, timeout=10).status_code == 202
        requests = receiver.wait_for(lambda seen: len(seen) >= 20, timeout=30)
        assert requests[0].json() == {"id": 0, "name": "Ada Lovelace-0"}
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    finally:
        daemon.stop()
    failures = [line for line in daemon.logs() if line.get("levelname") in {"ERROR", "CRITICAL"}]
    assert not failures
