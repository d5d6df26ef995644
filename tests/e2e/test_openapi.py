"""docs/openapi.yaml against the real daemon, with schemathesis generating the requests.

Every operation is exercised with generated inputs (valid ones and, in the coverage phase, broken
ones: missing or wrong bodies, odd headers, unknown sources). schemathesis's checks fail on any
5xx, on a status or content type the description does not list, and on a body that does not match
its schema; so this also proves every refusal is a documented 4xx with a JSON `{"error"}`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.depth import examples
from tests.fakes import ROOT, Daemon, write_config

if TYPE_CHECKING:  # schemathesis defines its OpenAPI case type for type checkers only
    from schemathesis.specs.openapi.schemas import OpenApiCase

SCHEMA = schemathesis.openapi.from_path(ROOT / "docs" / "openapi.yaml")

PIPELINE = """
[telemetry]
metrics = false

[sources.demo]
type = "webhook"
idempotency_header = "Idempotency-Key"

[sinks.out]
type = "file"
inputs = ["demo"]
path = "out.jsonl"
"""


@pytest.fixture(scope="module")
def daemon_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder: Path = tmp_path_factory.mktemp("openapi")
    daemon = Daemon(write_config(folder, PIPELINE), folder / "ferry.log").start()
    yield daemon.url
    daemon.stop()
    crashes = [line for line in daemon.logs() if line.get("level") in ("error", "critical")]
    assert crashes == [], crashes


@SCHEMA.parametrize()
@settings(max_examples=examples(60), deadline=None, suppress_health_check=list(HealthCheck))
def test_the_listener_answers_as_its_openapi_description_says(case: OpenApiCase, daemon_url: str) -> None:
    # Half the generated events go to the real source, so 202/200 are exercised, not only 404.
    if case.path == "/hooks/{source}" and case.path_parameters and zlib.crc32(repr(case.body).encode()) % 2:
        case.path_parameters["source"] = "demo"
    case.call_and_validate(base_url=daemon_url)
