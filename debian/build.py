"""Build ferry's Debian package from its wheel: `make deb` runs `python debian/build.py WHEEL`.

Layout of the package (what an operator finds; docs/runbook.md):

    /opt/ferry/.venv/                 a private venv: ferry and its dependencies, nothing else
    /usr/bin/ferry                    -> /opt/ferry/.venv/bin/ferry
    /lib/systemd/system/ferry.service, ferry.socket
    /usr/lib/sysusers.d/ferry.conf, /usr/lib/tmpfiles.d/ferry.conf
    /etc/ferry/config.toml            conffile, 0640 root:ferry (set by postinst)
    /usr/share/doc/ferry/             README, docs/*.md, copyright

How the venv is made, and why: the dependencies are installed with pip's cross-install options
(`--target` for CPython 3.11 on manylinux up to glibc 2.36, binary wheels only), pinned to the
versions in the build machine's dev venv when there is one (so the package holds what `make
test` tested), next to a hand-written venv skeleton whose interpreter is Debian 12's
`/usr/bin/python3.11`. Nothing of the build machine's Python ends up in the package: it builds
the same on any Linux with Python 3.11+ and pip, without root, a chroot or Debian's Python, and
the venv works at its installed path because every path in it (pyvenv.cfg, the symlinks, the
scripts' `#!`) is written for /opt/ferry/.venv. Bytecode is compiled by postinst with the
interpreter actually installed, as Debian's own Python packages do.

Environment: DEB_VERSION overrides the package version (default: pyproject's version + "-1"),
DEB_OUT the output folder (default: dist/), DEB_COMPRESSION dpkg-deb's -Z (default gzip; the
tests use none, which on a busy machine saves most of the build's time).
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/opt/ferry/.venv"
PYTHON = "python3.11"
GLIBC_MAX = 36  # Debian 12 (bookworm) has glibc 2.36
MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}
LEGACY_GLIBC = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}


def run(*argv: str | Path) -> str:
    """The standard output of a command that must succeed."""
    return subprocess.run([str(a) for a in argv], check=True, text=True, capture_output=True).stdout


def install(stage: Path, source: Path) -> Path:
    """Install `source` (ferry's wheel) and its dependencies into the venv under `stage`."""
    arch = run("dpkg", "--print-architecture").strip()
    machine = MACHINE.get(arch)
    if machine is None:
        sys.exit(f"build.py: no manylinux platform known for Debian architecture {arch!r}")
    venv = stage / PREFIX.lstrip("/")
    site = venv / "lib" / PYTHON / "site-packages"
    site.mkdir(parents=True)
    platforms = [f"manylinux_2_{v}_{machine}" for v in range(GLIBC_MAX, 16, -1)]
    platforms += [f"{legacy}_{machine}" for legacy in LEGACY_GLIBC]
    argv: list[str | Path] = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile"]
    argv += ["--disable-pip-version-check", "--no-warn-conflicts", "--target", site]
    argv += ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:"]
    for platform in platforms:
        argv += ["--platform", platform]
    constraints = pinned()
    if constraints is not None:
        argv += ["--constraint", constraints]
    subprocess.run([*map(str, argv), str(source)], check=True)
    shutil.rmtree(site / "bin", ignore_errors=True)  # pip's scripts name the build machine's Python
    (venv / "pyvenv.cfg").write_text(
        "home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11\n"
        f"executable = /usr/bin/{PYTHON}\n"
    )
    bin_dir = venv / "bin"
    bin_dir.mkdir()
    (bin_dir / PYTHON).symlink_to(f"/usr/bin/{PYTHON}")
    for alias in ("python", "python3"):
        (bin_dir / alias).symlink_to(PYTHON)
    for name, target in entry_points(site).items():
        module, _, function = target.partition(":")
        script = bin_dir / name
        script.write_text(
            f"#!{PREFIX}/bin/{PYTHON}\nimport sys\n"
            f"from {module} import {function}\n\nsys.exit({function}())\n"
        )
        script.chmod(0o755)
    return site


def pinned() -> Path | None:
    """The dev venv's versions as a pip constraints file, or None without a dev venv."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    if not venv_python.exists():
        return None
    frozen = run(venv_python, "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check")
    path = ROOT / "build" / "deb" / "constraints.txt"
    path.write_text("".join(line + "\n" for line in frozen.splitlines() if "==" in line))
    return path


def entry_points(site: Path) -> dict[str, str]:
    """ferry's console scripts, from its installed metadata."""
    [dist_info] = site.glob("ferry-*.dist-info")
    parser = configparser.ConfigParser()
    parser.read(dist_info / "entry_points.txt")
    return dict(parser["console_scripts"])


def glibc_needed(site: Path) -> int:
    """The highest glibc minor version any installed wheel is tagged for (0: none is binary)."""
    needed = 0
    for wheel in site.glob("*.dist-info/WHEEL"):
        for tag in re.findall(r"^Tag: .*-(\S+)$", wheel.read_text(), flags=re.MULTILINE):
            for platform in tag.split("."):
                if match := re.match(r"manylinux_2_(\d+)_", platform):
                    needed = max(needed, int(match[1]))
                elif platform.split("_")[0] in LEGACY_GLIBC:
                    needed = max(needed, LEGACY_GLIBC[platform.split("_")[0]])
    return needed


def copy(source: Path, dest: Path, mode: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    dest.chmod(mode)


def main(argv: list[str]) -> int:
    [wheel] = argv
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    version = os.environ.get("DEB_VERSION") or f"{project['version']}-1"
    out = Path(os.environ.get("DEB_OUT") or ROOT / "dist")
    stage = ROOT / "build" / "deb" / "root"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    site = install(stage, Path(wheel).resolve())

    systemd, debian = ROOT / "systemd", ROOT / "debian"
    copy(systemd / "ferry.service", stage / "lib/systemd/system/ferry.service", 0o644)
    copy(systemd / "ferry.socket", stage / "lib/systemd/system/ferry.socket", 0o644)
    copy(systemd / "ferry.sysusers.conf", stage / "usr/lib/sysusers.d/ferry.conf", 0o644)
    copy(systemd / "ferry.tmpfiles.conf", stage / "usr/lib/tmpfiles.d/ferry.conf", 0o644)
    copy(debian / "config.toml", stage / "etc/ferry/config.toml", 0o640)
    docs = stage / "usr/share/doc/ferry"
    copy(debian / "copyright", docs / "copyright", 0o644)
    copy(ROOT / "README.md", docs / "README.md", 0o644)
    for doc in sorted((ROOT / "docs").glob("*.md")):
        copy(doc, docs / doc.name, 0o644)
    (stage / "usr/bin").mkdir(parents=True)
    (stage / "usr/bin/ferry").symlink_to(f"{PREFIX}/bin/ferry")

    control = stage / "DEBIAN"
    control.mkdir()
    for script in ("postinst", "prerm", "postrm"):
        copy(debian / script, control / script, 0o755)
    copy(debian / "conffiles", control / "conffiles", 0o644)
    size = int(run("du", "-sk", "--apparent-size", "--exclude=DEBIAN", stage).split()[0])
    glibc = glibc_needed(site)
    depends = [f"{PYTHON}", "systemd (>= 252)"] + ([f"libc6 (>= 2.{glibc})"] if glibc else [])
    (control / "control").write_text(
        f"Package: ferry\nVersion: {version}\nArchitecture: {run('dpkg', '--print-architecture').strip()}\n"
        f"Maintainer: ferry developers <ferry@localhost>\nInstalled-Size: {size}\n"
        f"Depends: {', '.join(depends)}\nSection: net\nPriority: optional\n"
        f"Description: {project['description']}\n"
        " ferry takes events in (webhooks it receives, REST APIs it polls), reshapes them with jq and\n"
        " delivers them to other systems' APIs, through a durable SQLite outbox. It runs as the\n"
        " hardened systemd service ferry.service (optionally socket-activated by ferry.socket) and\n"
        " is steered with `ferry ctl`. Its Python dependencies live in a private venv under /opt/ferry.\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    deb = out / f"ferry_{version}_{run('dpkg', '--print-architecture').strip()}.deb"
    compression = os.environ.get("DEB_COMPRESSION") or "gzip"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(stage), str(deb)], check=True
    )
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
