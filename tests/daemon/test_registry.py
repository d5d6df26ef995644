"""The registry's two halves name the same component kinds, and each kind builds only from its own struct."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import msgspec
import pytest

from actors.sink.config import FileSinkConfig, HttpSinkConfig, SinkConfig
from actors.sink.sink import Sink
from daemon import registry
from daemon.component import Deps
from daemon.config import kinds
from daemon.limits.ratelimit import RateLimits
from daemon.store.sqlite import Store


def tag(struct: type[msgspec.Struct]) -> str:
    return str(struct.__struct_config__.tag)


def test_every_sink_kind_in_the_config_has_a_constructor_of_the_same_struct() -> None:
    assert (
        {tag(struct) for struct in get_args(SinkConfig)} == set(kinds.SINK_KINDS) == set(registry.SINK_KINDS)
    )
    for name, struct in kinds.SINK_KINDS.items():
        assert registry.SINK_KINDS[name].config is struct
        assert tag(struct) == name


def test_every_source_kind_in_the_config_is_a_member_of_the_union() -> None:
    assert {tag(struct): struct for struct in get_args(kinds.SourceConfig)} == dict(kinds.SOURCE_KINDS)
    for name, registration in registry.SOURCE_KINDS.items():
        assert kinds.SOURCE_KINDS[name] is registration.config


async def test_build_sink_picks_the_constructor_by_type(tmp_path: Path) -> None:
    store = Store(tmp_path / "ferry.db")
    deps = Deps(store, RateLimits(), quarantine_after=5)
    sink = registry.build_sink("out", FileSinkConfig(inputs=["in"], path=str(tmp_path / "out.jsonl")), deps)
    assert isinstance(sink, Sink)
    assert sink.name == "out"


async def test_a_kind_refuses_another_kinds_struct(tmp_path: Path) -> None:
    deps = Deps(Store(tmp_path / "ferry.db"), RateLimits())
    file_config = FileSinkConfig(inputs=["in"], path=str(tmp_path / "out.jsonl"))
    with pytest.raises(TypeError, match="FileSinkConfig is not a HttpSinkConfig"):
        registry.SINK_KINDS["http"].create("out", file_config, deps)
    assert registry.SINK_KINDS["http"].config is HttpSinkConfig
