"""The unit files read as what the package and the daemon provide (the running proof: tests/debian)."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

from daemon.config.root import load
from daemon.control.server import socket_path
from tests.fakes import ROOT

VENV_BIN = "/opt/ferry/.venv/bin/"


def directives(unit: str) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, in order (a key may repeat)."""
    found: dict[str, list[str]] = {}
    for raw in (ROOT / "systemd" / unit).read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_reload_asks_the_daemon_over_its_socket_and_needs_no_kill() -> None:
    [reload] = directives("ferry.service")["ExecReload"]
    argv = shlex.split(reload)
    assert argv[0] == VENV_BIN + "ferry"
    assert argv[1:2] == ["ctl"]
    assert argv[-1] == "reload"  # exits non-zero with the errors when the daemon refuses the file
    assert "kill" not in reload


def test_the_reload_socket_is_where_the_packaged_config_puts_it_under_systemd() -> None:
    [reload] = directives("ferry.service")["ExecReload"]
    argv = shlex.split(reload)
    named = Path(argv[argv.index("--socket") + 1])
    [runtime] = directives("ferry.service")["RuntimeDirectory"]
    loaded = load(ROOT / "debian" / "config.toml", read_secrets=False)
    assert socket_path(loaded, {"RUNTIME_DIRECTORY": f"/run/{runtime}"}) == named


def test_every_command_the_unit_runs_is_a_script_the_package_installs() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    unit = directives("ferry.service")
    for key in ("ExecStartPre", "ExecStart", "ExecReload"):
        for command in unit[key]:
            program = shlex.split(command)[0]
            assert program.startswith(VENV_BIN), (key, command)
            assert program.removeprefix(VENV_BIN) in scripts, (key, command)


def test_the_packaged_config_keeps_every_path_where_the_sandbox_can_write() -> None:
    config = load(ROOT / "debian" / "config.toml", read_secrets=False).config
    assert config.store.path.startswith("/var/lib/ferry/")
    assert config.control.group == "ferry"  # `ferry ctl` for members of group ferry
