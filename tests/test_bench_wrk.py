"""Every benchmark that drives wrk, run alone without it, stops at once with exit status 2 and the
reason, instead of starting daemons and failing half-way with `FileNotFoundError` (as
`python -m bench.peers` did when only `python -m bench` checked for wrk)."""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable

import pytest

import bench.harness

WHICH = shutil.which

MAINS: list[tuple[str, list[str]]] = [
    ("bench.__main__", ["--quick"]),
    ("bench.backends", ["--daemon", "1"]),
    ("bench.cluster", ["--quick"]),
    ("bench.cpu", ["--quick"]),
    ("bench.delivery", ["--quick"]),
    ("bench.encryption", ["--quick"]),
    ("bench.ingest", ["--quick"]),
    ("bench.peers", ["--quick"]),
    ("bench.tracing", ["--quick"]),
]


def _no_wrk(monkeypatch: pytest.MonkeyPatch) -> None:
    def which(name: str, *args: object, **kwargs: object) -> str | None:
        return None if name == "wrk" else WHICH(name)

    # by dotted path: the harness imports these modules without re-exporting them
    monkeypatch.setattr("bench.harness.shutil.which", which)
    monkeypatch.setattr("bench.harness.os.geteuid", lambda: 1000)  # not root: no apt-get here


@pytest.mark.parametrize(("module", "argv"), MAINS, ids=[module for module, _ in MAINS])
def test_a_benchmark_run_alone_without_wrk_says_so_and_exits_2(
    module: str, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_wrk(monkeypatch)
    main: Callable[[list[str]], int] = importlib.import_module(module).main
    assert main(argv) == 2
    assert "wrk is not installed" in capsys.readouterr().err


def test_wrk_missing_is_none_when_wrk_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.harness.shutil.which", lambda name, *a, **k: f"/usr/bin/{name}")
    assert bench.harness.wrk_missing() is None
