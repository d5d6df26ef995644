"""A Debian 12 system booted by a real systemd (`systemd-nspawn --boot`), for the package tests.

The root is `debootstrap --variant=minbase bookworm` plus what it needs to boot (systemd,
systemd-sysv) and ferry's Depends (python3.11): nothing else, no package lists, so an `apt
install ./ferry_*.deb` in it can only use what is already there (it installs offline, or
fails). It is built once into `.cache/debian-bookworm/` (or `$FERRY_CONTAINER_CACHE`, to share
it between clones; 2-4 minutes, ~300 MB) and reused while its recipe is unchanged, for 30 days
at most. Caching it is safe because no container ever writes to it: every boot runs on a
throw-away overlay (`--volatile=overlay`), so each test run starts from the same fresh system.
A build that did not finish is never used (it is renamed into place at the end).

The container shares the host's network namespace (ferry's listener on 127.0.0.1:PORT is
reached from the test, and a sink reaches the test's fake receiver), but not its processes,
mounts or users. The host needs no systemd of its own: the container is not registered with
machined (`--register=no --keep-unit`), and commands run in it through `nsenter` into its
init's namespaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.fakes import ROOT

SUITE = "bookworm"
MIRROR = os.environ.get("FERRY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ("systemd", "systemd-sysv", "python3.11")
CACHE = Path(os.environ.get("FERRY_CONTAINER_CACHE") or ROOT / ".cache") / f"debian-{SUITE}"
MAX_AGE = 30 * 86400  # then built again, to follow bookworm's point releases and security fixes
RECIPE = f"debootstrap --variant=minbase --include={','.join(PACKAGES)} {SUITE} {MIRROR}; no apt lists\n"
TOOLS = {
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "dpkg-deb": "dpkg",
    "nsenter": "util-linux",
}
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unavailable() -> str | None:
    """Why no container can be booted here (a skip reason), or None when it can."""
    if os.geteuid() != 0:
        return "booting a container with systemd-nspawn needs root"
    missing = [f"{tool} ({package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)}: `make container-tools` (as root) installs them"
    if not Path("/sys/fs/cgroup").is_dir() or not any(Path("/sys/fs/cgroup").iterdir()):
        return "no cgroup hierarchy mounted on /sys/fs/cgroup: systemd cannot boot in a container"
    return None


def cached_root() -> Path:
    """The Debian root, built on first use (one builder at a time across processes)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp, root = CACHE / "recipe", CACHE / "root"
    with (CACHE / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fresh = stamp.exists() and time.time() - stamp.stat().st_mtime < MAX_AGE
        if fresh and stamp.read_text() == RECIPE and root.is_dir():
            return root
        building = CACHE / "building"
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        stamp.unlink(missing_ok=True)
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, building, MIRROR],
            check=True,
            capture_output=True,
            timeout=900,
        )
        for leftover in ("var/lib/apt/lists", "var/cache/apt/archives"):
            for path in (building / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        (building / "etc/hostname").write_text("ferry-test\n")
        building.rename(root)
        stamp.write_text(RECIPE)
        return root


class Container:
    """One booted container; `run()` executes a command in it as root (or as `user`)."""

    def __init__(self, root: Path, log: Path, *, binds: dict[Path, str]) -> None:
        self.root, self.log = root, log
        self.machine = f"ferry-{os.getpid()}-{hashlib.sha1(str(log).encode()).hexdigest()[:6]}"
        self._binds = binds
        self._proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 120.0) -> Container:
        argv = ["systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit"]
        argv += ["--directory", str(self.root), "--machine", self.machine, "--volatile=overlay"]
        argv += ["--console=read-only", "--resolv-conf=off", "--timezone=off", "--link-journal=no"]
        argv += [f"--bind-ro={host}:{inside}" for host, inside in self._binds.items()]
        with self.log.open("wb") as out:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not self.leader:
            self._alive(deadline)
            self.leader = self._init_pid()
        while True:  # systemd answers on its private socket once it is up
            self._alive(deadline)
            state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout)
            if state.stdout.strip() in ("running", "degraded"):
                return self
            time.sleep(0.2)  # not started far enough to answer yet: poll with a deadline

    def _alive(self, deadline: float) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited {self._proc.returncode}:\n{self.boot_log()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the container did not boot in time:\n{self.boot_log()}")
        time.sleep(0.05)

    def _init_pid(self) -> int:
        """The container's init: nspawn's child process that runs systemd."""
        assert self._proc is not None
        for task in Path(f"/proc/{self._proc.pid}/task").glob("*/children"):
            for pid in task.read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
        return 0

    def boot_log(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def run(
        self,
        *argv: str,
        user: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in the container (a clean environment); with `check`, fail with its output."""
        enter = ["nsenter", "--target", str(self.leader), "--mount", "--uts", "--ipc", "--net", "--pid"]
        enter += ["--cgroup", "--root", "--wd", "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "SYSTEMD_PAGER="]
        if user is not None:  # setpriv: no PAM, no session; just the user's ids and groups
            become = 'u=$1; shift; exec setpriv --reuid="$u" --regid="$(id -g "$u")" --init-groups -- "$@"'
            enter += ["sh", "-c", become, "sh", user]
        done = subprocess.run(
            [*enter, *argv], capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
            )
        return done

    def write(self, path: str, text: str, mode: str = "0644", group: str = "root") -> None:
        """Write a file in the container, owned by root and `group`."""
        self.run("install", "-D", "-m", mode, "-g", group, "/dev/stdin", path, input=text)

    def stop(self) -> None:
        """Shut the container down (SIGTERM makes nspawn halt it), SIGKILL after 30 s."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


@contextlib.contextmanager
def booted(log: Path, *, binds: dict[Path, str]) -> Iterator[Container]:
    """A container booted on a fresh overlay of the cached root, shut down afterwards."""
    container = Container(cached_root(), log, binds=binds)
    try:
        yield container.boot()
    finally:
        container.stop()
