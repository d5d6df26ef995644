"""ferry's Debian package in a Debian 12 system booted by a real systemd (see `container.py`).

`make deb`'s package is installed with `apt install` into a fresh minimal bookworm container
with no package lists (so offline) and run by systemd as an operator would: enabled and
started by hand, reloaded, killed, stopped by its watchdog, socket-activated, steered with
`ferry ctl`, upgraded, removed and purged. The unit's sandbox is the real one here: its seccomp
filter and MemoryDenyWriteExecute are enforced by systemd on the daemon and on a probe run in
the same unit.

One test walks the whole life of the package in one container, step by step (each step is a
function below, named for what it proves; a failure names its step). It is one test rather
than one per step because the steps build on each other's state and must run in order on one
xdist worker: `xdist_group` would do that, but pytest-xdist 3.8's `--dist loadgroup` has no
effect under pytest 9.2 (it renames `item._nodeid`, which pytest 9 no longer reads). It skips,
saying why, only where no container can be booted (not root, tools missing: `make
container-tools`); with FERRY_REQUIRE_CONTAINER set (.ci/run sets it) that is an error instead,
so CI cannot skip it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from tests.debian.container import Container, booted, unavailable
from tests.fakes import ROOT, FakeReceiver, Received, Reply, free_port

UNAVAILABLE = unavailable()
if UNAVAILABLE is not None and os.environ.get("FERRY_REQUIRE_CONTAINER"):  # set by .ci/run
    raise RuntimeError(f"FERRY_REQUIRE_CONTAINER is set, but {UNAVAILABLE}")

pytestmark = [
    pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE)),
    pytest.mark.timeout(900),  # a cold cache (debootstrap) takes a few minutes on its own
]

T = TypeVar("T")
TOKEN = "s3cr3t-crm-token"
WATCHDOG_SEC = 6

# The unit's sandbox, probed from inside it: ExecStartPost= runs with the unit's seccomp filter
# and MemoryDenyWriteExecute. Each of these calls succeeds for an unprivileged user elsewhere.
PROBE_PATH = "/usr/local/lib/ferry-sandbox-probe.py"
PROBE = """
import mmap, os, tempfile
def attempt(name, call):
    try:
        call()
        print("probe:", name, "allowed")
    except PermissionError:
        print("probe:", name, "refused")
wx = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
attempt("write+execute mapping", lambda: mmap.mmap(-1, 4096, prot=wx))
attempt("setpriority", lambda: os.setpriority(os.PRIO_PROCESS, 0, 5))
attempt("chown", lambda: os.chown(tempfile.mkstemp()[1], -1, os.getgid()))
"""

CONFIG = """
[store]
path = "/var/lib/ferry/ferry.db"

[listener]
address = "127.0.0.1:{port}"

[control]
group = "ferry"

[telemetry]
metrics = false
traces = false

[sources.demo]
type = "webhook"

[transforms.shape]
inputs = ["demo"]
map = '{{id: .id, name: .name}}'

[sinks.demo_file]
type = "file"
inputs = ["shape"]
path = "/var/lib/ferry/demo-out.jsonl"

[sinks.crm]
type = "http"
inputs = ["shape"]
url = "{receiver}/contacts"
auth = {{ type = "bearer", token = "credential:crm-token" }}
retry = {{ max_attempts = 1000, initial_backoff = "100ms", max_backoff = "500ms" }}
{extra}
"""

DROP_IN = f"""[Service]
LoadCredential=crm-token:/etc/ferry/credentials/crm-token
WatchdogSec={WATCHDOG_SEC}s
RestartSec=1s
ExecStartPost=/opt/ferry/.venv/bin/python3 {PROBE_PATH}
"""


def wait(check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


# -- the package and the system ------------------------------------------------------------


@dataclass
class Packages:
    first: Path
    upgrade: Path
    version: str


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    """This tree's wheel and `.deb` (debian/build.py), and the same repacked one version higher."""
    out = tmp_path_factory.mktemp("dist")
    (ROOT / ".cache").mkdir(exist_ok=True)
    with (ROOT / ".cache" / "deb-build.lock").open("w") as lock:  # build/ is shared by builds
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(ROOT / "build" / "lib", ignore_errors=True)  # as `make wheel`: no stale modules
        subprocess.run(
            [sys.executable, "-m", "build", "--wheel", "--outdir", out, ROOT],
            check=True,
            capture_output=True,
            timeout=300,
        )
        [wheel] = out.glob("ferry-*.whl")
        built = subprocess.run(
            [sys.executable, ROOT / "debian" / "build.py", wheel],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEB_OUT": str(out), "DEB_COMPRESSION": "none"},
        )
    first = Path(built.stdout.strip().splitlines()[-1])
    version = subprocess.run(
        ["dpkg-deb", "--field", first, "Version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    tree = tmp_path_factory.mktemp("repack") / "tree"
    subprocess.run(["dpkg-deb", "--raw-extract", first, tree], check=True)
    control = tree / "DEBIAN" / "control"
    control.write_text(control.read_text().replace(f"Version: {version}", f"Version: {version}+upgrade"))
    upgrade = out / first.name.replace(version, f"{version}+upgrade")
    subprocess.run(["dpkg-deb", "-Znone", "--build", tree, upgrade], check=True, capture_output=True)
    shutil.rmtree(tree)
    return Packages(first, upgrade, version)


class Receiver(FakeReceiver):
    """The CRM the http sink delivers to, on the host; answers 503 while `down` is set."""

    def __init__(self) -> None:
        super().__init__(responder=self._answer)
        self.down = threading.Event()

    def _answer(self, request: Received) -> Reply:
        if self.down.is_set():
            return -1, {}, b""  # hang up: a transport error, retried
        return 200, {}, b'{"ok":true}'

    def ids(self) -> set[int]:
        return {r.json()["id"] for r in self.snapshot()}


@dataclass
class System:
    container: Container
    packages: Packages
    receiver: Receiver
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self, extra: str = "") -> str:
        return CONFIG.format(port=self.port, receiver=self.receiver.url, extra=extra)

    def write_config(self, text: str) -> None:
        """Replace /etc/ferry/config.toml, keeping its owner and mode (root:ferry 0640)."""
        self.container.write("/etc/ferry/config.toml", text, mode="0640", group="ferry")

    def main_pid(self) -> int:
        return int(self.sh("systemctl show --property MainPID --value ferry.service").strip())

    def sh(self, command: str, timeout: float = 60.0) -> str:
        """The output of a shell command run as root in the container, which must succeed."""
        done = self.container.run("sh", "-c", command, timeout=timeout, check=False)
        if done.returncode != 0:
            journal = self.container.run("journalctl", "-u", "ferry*", "-n", "40", "--no-pager", check=False)
            raise AssertionError(
                f"{command} exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}\n"
                f"journal:\n{journal.stdout}"
            )
        return done.stdout

    def journal(self) -> list[str]:
        """The unit's journal (systemd's lines and the processes' output), one message per line."""
        return self.sh("journalctl --unit ferry.service --output cat --no-pager").splitlines()

    def daemon_logs(self, pid: int) -> list[dict[str, object]]:
        """The JSON log lines of daemon process `pid`, from the journal."""
        out = self.sh(f"journalctl _PID={pid} --output cat --no-pager")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def lines(self, path: str) -> list[dict[str, object]]:
        text = self.container.run("cat", path, check=False).stdout
        return [json.loads(line) for line in text.splitlines()]

    def post(self, n: int) -> None:
        response = httpx.post(f"{self.url}/hooks/demo", json={"id": n, "name": f"n{n}"}, timeout=10)
        assert response.status_code == 202, response.text


@pytest.fixture
def system(packages: Packages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """A booted container with the package installed (nothing configured or started yet)."""
    logs = tmp_path_factory.mktemp("container")
    receiver = Receiver().start()
    with booted(logs / "boot.log", binds={packages.first.parent: "/mnt/dist"}) as container:
        installed = container.run(
            "apt-get", "install", "--yes", f"/mnt/dist/{packages.first.name}", timeout=180
        )
        assert "Setting up ferry" in installed.stdout
        yield System(container, packages, receiver, free_port())
    receiver.stop()


# -- the steps, in the order an operator meets these things ---------------------------------


def step_install_creates_the_user_and_directories_and_starts_nothing(system: System) -> None:
    run = system.sh
    assert "uid=" in run("id ferry")
    assert run("stat -c '%U:%G %a' /var/lib/ferry /etc/ferry/config.toml /etc/ferry/credentials").split("\n")[
        :3
    ] == ["ferry:ferry 750", "root:ferry 640", "root:root 700"]
    assert run("systemctl is-enabled ferry.service ferry.socket || true").split() == ["disabled", "disabled"]
    assert run("systemctl is-active ferry.service ferry.socket || true").split() == ["inactive", "inactive"]
    assert "/etc/ferry/config.toml" in run("dpkg-query --showformat '${Conffiles}' --show ferry")
    # The venv runs on Debian's own interpreter, at its installed path; the packaged config is valid.
    assert run("/opt/ferry/.venv/bin/python3 -c 'import sys; print(sys.prefix, sys.version)'").startswith(
        "/opt/ferry/.venv 3.11."
    )
    assert "ok (1 source(s), 1 transform(s), 1 sink(s))" in run("ferry check -c /etc/ferry/config.toml")


def step_enable_now_returns_once_ready_and_a_webhook_reaches_both_sinks(system: System) -> None:
    container = system.container
    system.write_config(system.config())
    container.write("/etc/ferry/credentials/crm-token", TOKEN + "\n", mode="0600")
    container.write(PROBE_PATH, PROBE)
    container.write("/etc/systemd/system/ferry.service.d/test.conf", DROP_IN)
    system.sh("systemctl daemon-reload && systemctl enable --now ferry")
    # Type=notify: `systemctl start` came back after READY=1, so the listener accepts at once.
    system.post(1)
    assert system.sh("systemctl is-active ferry") == "active\n"
    assert wait(lambda: system.lines("/var/lib/ferry/demo-out.jsonl"), "the file sink")[0]["event"] == {
        "id": 1,
        "name": "n1",
    }
    [request] = system.receiver.wait_for(lambda seen: len(seen) >= 1)
    assert request.headers["authorization"] == f"Bearer {TOKEN}"  # LoadCredential= → credential:crm-token
    assert TOKEN not in system.sh("cat /etc/ferry/config.toml")
    status = wait(
        lambda: re.search(r'Status: "([^"]*events received[^"]*)"', system.sh("systemctl status ferry")),
        "STATUS= in systemctl status",
    )
    assert "since start" in status[1]
    logs = system.daemon_logs(system.main_pid())
    assert any(line.get("msg") == "ready" for line in logs)  # journalctl -u ferry: the daemon's JSON
    assert [line for line in logs if line.get("level") not in ("info", "debug")] == []


def step_the_units_sandbox_is_enforced_for_real(system: System) -> None:
    pid = system.main_pid()
    status = system.sh(f"cat /proc/{pid}/status")
    assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE), status  # a seccomp filter is loaded
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.MULTILINE)
    assert "CapEff:\t0000000000000000" in status
    probe = [line for line in system.journal() if line.startswith("probe:")]
    assert probe[:3] == [
        "probe: write+execute mapping refused",  # MemoryDenyWriteExecute=yes
        "probe: setpriority refused",  # SystemCallFilter=~@resources
        "probe: chown refused",  # SystemCallFilter=~@privileged
    ]


def step_ferry_ctl_is_allowed_for_group_ferry_and_refused_for_others(system: System) -> None:
    system.sh("useradd --groups ferry alice && useradd bob")
    allowed = system.container.run("ferry", "ctl", "-c", "/etc/ferry/config.toml", "status", user="alice")
    assert "demo" in allowed.stdout
    for user in ("bob", "nobody"):
        refused = system.container.run(
            "ferry", "ctl", "--socket", "/run/ferry/ferry.sock", "status", user=user, check=False
        )
        assert refused.returncode == 1, refused
        assert "permission denied" in refused.stderr


def step_systemctl_reload_applies_a_good_config_and_fails_on_a_bad_one(system: System) -> None:
    pid = system.main_pid()
    more = '\n[sinks.more]\ntype = "file"\ninputs = ["demo"]\npath = "/var/lib/ferry/more.jsonl"\n'
    system.write_config(system.config(more))
    system.sh("systemctl reload ferry")
    system.post(2)
    [line] = wait(lambda: system.lines("/var/lib/ferry/more.jsonl"), "the added sink")
    assert line["event"] == {"id": 2, "name": "n2"}

    broken = more + '\n[sinks.broken]\ntype = "file"\ninputs = ["nowhere"]\npath = "/var/lib/ferry/b.jsonl"\n'
    system.write_config(system.config(broken))
    failed = system.container.run("systemctl", "reload", "ferry", check=False)
    assert failed.returncode != 0
    journal = "\n".join(system.journal())
    assert "$.sinks.broken.inputs[0]: unknown input 'nowhere'" in journal
    assert system.sh("systemctl is-active ferry") == "active\n"
    assert system.main_pid() == pid  # the daemon kept running, with its last good config
    system.post(3)
    assert wait(lambda: len(system.lines("/var/lib/ferry/more.jsonl")) == 2, "the kept sink")
    system.write_config(system.config(more))
    system.sh("systemctl reload ferry")


def _restarted(system: System, old: int) -> int:
    def new_pid() -> int | None:
        pid = system.main_pid()
        active = system.container.run("systemctl", "is-active", "ferry", check=False).stdout
        return pid if pid not in (0, old) and active == "active\n" else None

    return wait(new_pid, "systemd to restart ferry", timeout=WATCHDOG_SEC + 40)


def step_kill_9_is_restarted_by_systemd_and_loses_nothing(system: System) -> None:
    system.receiver.down.set()
    sent = range(100, 130)
    for n in sent:
        system.post(n)
    pid = system.main_pid()
    system.sh(f"kill -9 {pid}")
    _restarted(system, pid)
    system.receiver.down.clear()
    system.receiver.wait_for(lambda _: set(sent) <= system.receiver.ids())
    assert set(sent) <= {line["event"]["id"] for line in system.lines("/var/lib/ferry/demo-out.jsonl")}  # type: ignore[index]


def step_a_stopped_event_loop_is_killed_by_the_watchdog_and_restarted(system: System) -> None:
    system.receiver.down.set()
    sent = range(200, 220)
    for n in sent:
        system.post(n)
    pid = system.main_pid()
    restarts = int(system.sh("systemctl show --property NRestarts --value ferry"))
    system.sh(f"kill -STOP {pid}")
    _restarted(system, pid)
    assert int(system.sh("systemctl show --property NRestarts --value ferry")) == restarts + 1
    assert any(
        "Watchdog timeout" in line for line in system.sh("journalctl -u ferry --no-pager").splitlines()
    )
    system.receiver.down.clear()
    system.receiver.wait_for(lambda _: set(sent) <= system.receiver.ids())


def step_socket_activation_starts_ferry_on_the_first_connection(system: System) -> None:
    port = free_port()
    system.sh("systemctl disable --now ferry.service")
    system.container.write(
        "/etc/systemd/system/ferry.socket.d/port.conf",
        f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n",
    )
    system.sh("systemctl daemon-reload && systemctl start ferry.socket")
    assert system.sh("systemctl is-active ferry.service || true") == "inactive\n"
    response = httpx.post(f"http://127.0.0.1:{port}/hooks/demo", json={"id": 300, "name": "n300"}, timeout=30)
    assert response.status_code == 202  # served by the ferry that this connection started
    wait(lambda: system.sh("systemctl is-active ferry.service || true") == "active\n", "ferry.service active")
    logs = system.daemon_logs(system.main_pid())
    assert any(f"127.0.0.1:{port}" in str(line.get("msg")) for line in logs)
    system.receiver.wait_for(lambda _: 300 in system.receiver.ids())
    system.sh("systemctl stop ferry.socket ferry.service && rm /etc/systemd/system/ferry.socket.d/port.conf")
    system.sh("systemctl daemon-reload && systemctl enable --now ferry.service")


def step_upgrade_keeps_the_database_and_pending_deliveries_remove_keeps_it_and_purge_deletes_it(
    system: System,
) -> None:
    run = system.sh
    system.receiver.down.set()
    sent = range(400, 420)
    for n in sent:
        system.post(n)
    config = run("cat /etc/ferry/config.toml")
    before = run("stat -c %i /var/lib/ferry/ferry.db")
    run(f"apt-get install --yes /mnt/dist/{system.packages.upgrade.name}", timeout=180)
    assert run("dpkg-query --showformat '${Version}' --show ferry") == f"{system.packages.version}+upgrade"
    assert run("systemctl is-active ferry") == "active\n"  # it ran before, so it runs again
    assert run("stat -c %i /var/lib/ferry/ferry.db") == before
    assert run("cat /etc/ferry/config.toml") == config  # the conffile keeps the operator's edits
    system.receiver.down.clear()
    system.receiver.wait_for(lambda _: set(sent) <= system.receiver.ids())

    run("apt-get remove --yes ferry", timeout=120)
    assert run("systemctl is-active ferry || true") == "inactive\n"
    assert run("test -s /var/lib/ferry/ferry.db && test -f /etc/ferry/config.toml && echo kept") == "kept\n"
    assert run("test -e /opt/ferry || echo gone") == "gone\n"  # nothing left behind (bytecode)
    run("apt-get purge --yes ferry", timeout=120)
    assert run("test -e /var/lib/ferry || test -e /etc/ferry/config.toml || echo purged") == "purged\n"


def test_the_package_installs_and_runs_under_a_real_systemd(system: System) -> None:
    step_install_creates_the_user_and_directories_and_starts_nothing(system)
    step_enable_now_returns_once_ready_and_a_webhook_reaches_both_sinks(system)
    step_the_units_sandbox_is_enforced_for_real(system)
    step_ferry_ctl_is_allowed_for_group_ferry_and_refused_for_others(system)
    step_systemctl_reload_applies_a_good_config_and_fails_on_a_bad_one(system)
    step_kill_9_is_restarted_by_systemd_and_loses_nothing(system)
    step_a_stopped_event_loop_is_killed_by_the_watchdog_and_restarted(system)
    step_socket_activation_starts_ferry_on_the_first_connection(system)
    step_upgrade_keeps_the_database_and_pending_deliveries_remove_keeps_it_and_purge_deletes_it(system)
