"""`Running.actors` keeps each kind apart: what `pause` holds, what a reload forgets."""

from __future__ import annotations

from pathlib import Path

from actors.sink.config import FileSinkConfig
from daemon import registry
from daemon.component import Deps
from daemon.limits.ratelimit import RateLimits
from daemon.running import Actors
from daemon.store.sqlite import Store


def test_a_sink_is_pausable_and_forgotten_by_name(tmp_path: Path) -> None:
    deps = Deps(Store(tmp_path / "ferry.db"), RateLimits())
    sink = registry.build_sink("out", FileSinkConfig(inputs=["in"], path=str(tmp_path / "o.jsonl")), deps)
    actors = Actors(sinks={"out": sink})
    assert "out" in actors
    assert "in" not in actors
    actors.pausable("out").pause()
    assert sink.paused
    actors.remove("out")
    actors.remove("never-there")
    assert "out" not in actors
    assert actors.sinks == {}
