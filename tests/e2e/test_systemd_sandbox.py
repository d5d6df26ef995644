"""The real daemon under the sandbox ferry.service asks of systemd, rebuilt here without systemd.

- `MemoryDenyWriteExecute=yes` refuses mappings that are (or become) writable and executable;
  the kernel's `PR_SET_MDWE` (Linux 6.3+) enforces the same rule on a process and its exec.
- `SystemCallFilter=@system-service` + `~@privileged @resources` with `SystemCallErrorNumber=EPERM`
  is a seccomp allow-list; the same list (expanded by `systemd-analyze syscall-filter`) is
  loaded through libseccomp's Python binding (Debian: python3-seccomp).

Each test skips where its mechanism is missing, so `make test` needs neither.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes import Daemon, FakeReceiver, write_config

SYSTEM_PYTHON = "/usr/bin/python3"  # where python3-seccomp installs

# Sets MDWE, optionally loads the seccomp allow-list in argv[1], then execs argv[2:].
SANDBOX = """
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
if sys.argv[1]:
    import seccomp
    rules = seccomp.SyscallFilter(seccomp.ERRNO(errno.EPERM))
    for name in open(sys.argv[1]).read().split():
        try:
            rules.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError, OSError):
            pass  # not a system call on this architecture
    rules.load()
os.execv(sys.argv[2], sys.argv[2:])
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


def _expand(group: str, seen: set[str]) -> set[str]:
    """The system calls in a systemd syscall group, nested groups included."""
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, check=True
    ).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name.startswith("@"):
            if name not in seen:
                seen.add(name)
                calls |= _expand(name, seen)
        else:
            calls.add(name)
    return calls


def _has_seccomp() -> bool:
    if shutil.which("systemd-analyze") is None or not Path(SYSTEM_PYTHON).exists():
        return False
    return (
        subprocess.run([SYSTEM_PYTHON, "-c", "import seccomp"], capture_output=True, check=False).returncode
        == 0
    )


@pytest.fixture(scope="module")
def syscalls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unit's allow-list as a file of names: @system-service minus @privileged and @resources."""
    if not _has_seccomp():
        pytest.skip("needs systemd-analyze and python3-seccomp")
    allowed = _expand("@system-service", set()) - _expand("@privileged", set()) - _expand("@resources", set())
    path = tmp_path_factory.mktemp("seccomp") / "allowed.txt"
    path.write_text("\n".join(sorted(allowed)))
    return path


def _sandbox(interpreter: str, allowed: Path | None) -> list[str]:
    return [interpreter, "-c", SANDBOX, str(allowed or "")]


@pytest.fixture(scope="module")
def mdwe() -> None:
    probe = subprocess.run(
        [*_sandbox(sys.executable, None), sys.executable, "-c", ""], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"kernel without PR_SET_MDWE: {probe.stderr.decode().strip()}")


@pytest.fixture
def receiver() -> Iterator[FakeReceiver]:
    fake = FakeReceiver().start()
    yield fake
    fake.stop()


def _run_pipeline(tmp_path: Path, receiver: FakeReceiver, launcher: list[str]) -> None:
    config = write_config(tmp_path, PIPELINE.format(url=receiver.url))
    daemon = Daemon(config, tmp_path / "ferry.log", launcher=launcher)
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


def test_write_execute_mappings_are_refused_in_the_sandbox(mdwe: None) -> None:
    probe = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    result = subprocess.run(
        [*_sandbox(sys.executable, None), sys.executable, "-c", probe], capture_output=True, check=False
    )
    assert result.returncode != 0
    assert b"PermissionError" in result.stderr


def test_daemon_with_jq_and_sqlite_runs_without_write_execute_memory(
    mdwe: None, tmp_path: Path, receiver: FakeReceiver
) -> None:
    _run_pipeline(tmp_path, receiver, _sandbox(sys.executable, None))


def test_privileged_system_calls_fail_with_eperm_in_the_sandbox(mdwe: None, syscalls: Path) -> None:
    probe = "import os; os.chroot('/')"  # @privileged; would succeed for root outside the filter
    result = subprocess.run(
        [*_sandbox(SYSTEM_PYTHON, syscalls), sys.executable, "-c", probe], capture_output=True, check=False
    )
    assert result.returncode != 0
    assert b"Operation not permitted" in result.stderr


def test_daemon_runs_under_the_units_system_call_filter(
    mdwe: None, syscalls: Path, tmp_path: Path, receiver: FakeReceiver
) -> None:
    _run_pipeline(tmp_path, receiver, _sandbox(SYSTEM_PYTHON, syscalls))
