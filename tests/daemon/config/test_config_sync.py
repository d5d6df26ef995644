"""`ordering` and `enrich` in the config: good tables load, every bad one names its TOML path."""

from __future__ import annotations

import pytest

from actors.sink.config import HttpSinkConfig
from daemon.config.root import parse
from daemon.errors import ConfigError

BASE = """
[rate_limits.hubspot]
rate = 100
per = "10s"

[sources.sf]
type = "webhook"

[transforms.contact]
inputs = ["sf"]
{enrich}

[sinks.crm]
type = "http"
inputs = ["contact"]
url = "http://127.0.0.1:9/x"
{ordering}
"""


def config(enrich: str = "", ordering: str = "") -> str:
    return BASE.format(enrich=enrich, ordering=ordering)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.problems


def test_ordering_and_enrich_load() -> None:
    loaded = parse(
        config(
            'enrich = { url = "http://127.0.0.1:9/accounts/{.account}", merge = ". + {a: $lookup}", '
            'rate_limit = "hubspot", cache_ttl = "5m" }',
            'ordering = { key = ".email", version = ".updated_at", compare = "rfc3339" }',
        )
    )
    sink = loaded.sinks["crm"]
    assert isinstance(sink, HttpSinkConfig)
    assert sink.ordering is not None
    assert sink.ordering.compare == "rfc3339"
    enrich = loaded.transforms["contact"].enrich
    assert enrich is not None
    assert enrich.cache_ttl == 300.0


@pytest.mark.parametrize(
    ("ordering", "expected"),
    [
        ('ordering = { key = ".email |", version = ".v" }', "$.sinks.crm.ordering.key: invalid jq program"),
        ('ordering = { key = ".email", version = "][" }', "$.sinks.crm.ordering.version: invalid jq program"),
        ('ordering = { key = ".email", version = ".v", compare = "date" }', "$.sinks.crm.ordering.compare"),
        ('ordering = { key = ".email" }', "$.sinks.crm.ordering: Object missing required field `version`"),
        ('ordering = { key = "", version = ".v" }', "$.sinks.crm.ordering.key"),
    ],
)
def test_bad_ordering_names_its_path(ordering: str, expected: str) -> None:
    assert any(problem.startswith(expected) for problem in problems(config(ordering=ordering))), problems(
        config(ordering=ordering)
    )


@pytest.mark.parametrize(
    ("enrich", "expected"),
    [
        (
            'enrich = { url = "http://x/{.a |}", merge = "." }',
            "$.transforms.contact.enrich.url: invalid jq program",
        ),
        (
            'enrich = { url = "http://x/{.a}", merge = ". +" }',
            "$.transforms.contact.enrich.merge: invalid jq program",
        ),
        ('enrich = { url = "http://x/", merge = ".", when = "((" }', "$.transforms.contact.enrich.when"),
        ('enrich = { url = "ftp://x/", merge = "." }', "$.transforms.contact.enrich.url"),
        (
            'enrich = { url = "http://x/", merge = ".", rate_limit = "nope" }',
            "$.transforms.contact.enrich.rate_limit: unknown rate limit 'nope' (known: hubspot)",
        ),
        (
            'enrich = { url = "http://x/", merge = ".", '
            'retry = { initial_backoff = "1m", max_backoff = "1s" } }',
            "$.transforms.contact.enrich.retry.initial_backoff: larger than max_backoff",
        ),
        ('enrich = { url = "http://x/", merge = ".", colour = "red" }', "$.transforms.contact.enrich.colour"),
        (
            'enrich = { url = "http://x/", merge = "." }\naggregate = { key = ".a", max_events = 2 }',
            "$.transforms.contact.enrich: not with `aggregate` in the same transform",
        ),
    ],
)
def test_bad_enrich_names_its_path(enrich: str, expected: str) -> None:
    found = problems(config(enrich=enrich))
    assert any(problem.startswith(expected) for problem in found), found
