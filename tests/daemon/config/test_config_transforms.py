"""`ferry check` on a transform's schema, routes and aggregate: each mistake named by its TOML path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.transform.config import AggregateConfig, RouteConfig
from daemon.cli.ferry import main
from daemon.config.root import parse
from daemon.config.units import Duration
from daemon.errors import ConfigError

BASE = """
[sources.sf]
type = "webhook"

[sinks.crm]
type = "file"
inputs = ["contact"]
path = "crm.jsonl"

[sinks.hubspot]
type = "file"
inputs = ["contact"]
path = "hubspot.jsonl"

[transforms.contact]
inputs = ["sf"]
"""


def problems(text: str, base_dir: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, base_dir=base_dir)
    return info.value.problems


def test_routes_schema_and_aggregate_decode() -> None:
    config = parse(
        BASE
        + """routes = [
  { when = '.type == "lead"', to = ["crm"] },
  { when = '.type == "contact"', to = ["hubspot", "crm"] },
]
default_route = ["crm"]
schema = { type = "object", required = ["email"] }
aggregate = { key = ".category", max_events = 100, max_age = "10s", reduce = "length" }
"""
    )
    transform = config.transforms["contact"]
    assert transform.routes == [
        RouteConfig(when='.type == "lead"', to=["crm"]),
        RouteConfig(when='.type == "contact"', to=["hubspot", "crm"]),
    ]
    assert transform.default_route == ["crm"]
    assert transform.schema == {"type": "object", "required": ["email"]}
    assert transform.aggregate == AggregateConfig(
        key=".category", reduce="length", max_events=100, max_age=Duration(10)
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param(
            'routes = [{ when = \'.a ==\', to = ["crm", "hubspot"] }]',
            ["$.transforms.contact.routes[0].when: invalid jq program:"],
            id="bad-jq",
        ),
        pytest.param(
            'routes = [{ when = \'.a\', to = ["crm", "ghost", "hubspot"] }]',
            ["$.transforms.contact.routes[0].to[1]: unknown sink 'ghost' (routes send to sinks)"],
            id="unknown-sink",
        ),
        pytest.param(
            'routes = [{ when = \'.a\', to = ["crm", "contact", "hubspot"] }]',
            ["$.transforms.contact.routes[0].to[1]: unknown sink 'contact' (routes send to sinks)"],
            id="a-transform-is-not-a-sink",
        ),
        pytest.param(
            "routes = [{ when = '.a', to = [\"crm\"] }]",
            [
                "$.transforms.contact.routes: sink 'hubspot' reads 'contact' but no route "
                "(nor default_route) sends to it"
            ],
            id="a-reader-never-reached",
        ),
        pytest.param(
            'routes = [{ when = \'.a\', to = ["crm", "hubspot", "other"] }]\n'
            '[sinks.other]\ntype = "file"\ninputs = ["sf"]\npath = "o"\n',
            [
                "$.transforms.contact.routes[0].to[2]: sink 'other' does not read 'contact' "
                "(add 'contact' to its inputs)"
            ],
            id="sink-not-reading-the-transform",
        ),
        pytest.param(
            'default_route = ["crm"]',
            ["$.transforms.contact.default_route: set without `routes`"],
            id="default-without-routes",
        ),
        pytest.param(
            'routes = [{ when = \'.a\', to = ["crm"] }]\ndefault_route = ["nobody"]',
            [
                "$.transforms.contact.default_route[0]: unknown sink 'nobody' (routes send to sinks)",
                "$.transforms.contact.routes: sink 'hubspot' reads 'contact' but no route "
                "(nor default_route) sends to it",
            ],
            id="unknown-default",
        ),
        pytest.param(
            "routes = [{ when = '.a', to = [] }]",
            ["$.transforms.contact.routes[0].to: Expected `array` of length >= 1"],
            id="empty-to",
        ),
        pytest.param(
            'aggregate = { key = ".k" }',
            ["$.transforms.contact.aggregate: set max_events, max_age or both (when does a window close?)"],
            id="window-never-closes",
        ),
        pytest.param(
            'aggregate = { key = ".k[", max_events = 0, max_age = "1s" }',
            ["$.transforms.contact.aggregate.max_events: Expected `int` >= 1"],
            id="zero-events",
        ),
        pytest.param(
            'aggregate = { key = ".k[", reduce = "add +", max_age = "0s" }',
            [
                "$.transforms.contact.aggregate.key: invalid jq program:",
                "$.transforms.contact.aggregate.reduce: invalid jq program:",
                "$.transforms.contact.aggregate.max_age: must be longer than 0s",
            ],
            id="bad-key-reduce-and-age",
        ),
        pytest.param(
            'schema = { type = "objekt" }',
            ["$.transforms.contact.schema: not valid JSON Schema: 'objekt' is not valid under any of the"],
            id="invalid-inline-schema",
        ),
        pytest.param(
            "schema = { pattern = 'a{,2}' }",
            ['$.transforms.contact.schema: cannot be compiled: "a{,2}" is not a "regex"'],
            id="a-pattern-the-validator-cannot-compile",
        ),
        pytest.param(
            "schema = 3",
            ["$.transforms.contact.schema: Expected `str | object | null`, got `int`"],
            id="schema-of-the-wrong-type",
        ),
    ],
)
def test_mistakes_are_named_by_their_path(extra: str, expected: list[str]) -> None:
    found = problems(BASE + extra + "\n")
    assert len(found) == len(expected), found
    for problem, start in zip(found, expected, strict=True):
        assert problem.startswith(start), problem


def test_schema_files_resolve_from_the_config_folder_and_are_checked(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "contact.json").write_text(json.dumps({"type": "object"}))
    (tmp_path / "schemas" / "broken.json").write_text("{not json")
    (tmp_path / "schemas" / "list.json").write_text("[]")
    config = parse(BASE + 'schema = "schemas/contact.json"\n', base_dir=tmp_path)
    assert config.transforms["contact"].schema == str(tmp_path / "schemas" / "contact.json")

    [missing] = problems(BASE + 'schema = "schemas/missing.json"\n', base_dir=tmp_path)
    assert missing == (
        f"$.transforms.contact.schema: cannot read {tmp_path}/schemas/missing.json: No such file or directory"
    )
    [broken] = problems(BASE + 'schema = "schemas/broken.json"\n', base_dir=tmp_path)
    assert broken.startswith(f"$.transforms.contact.schema: {tmp_path}/schemas/broken.json is not JSON:")
    [listed] = problems(BASE + 'schema = "schemas/list.json"\n', base_dir=tmp_path)
    assert listed.endswith("list.json: a schema must be a JSON object, got list")


def test_check_exits_2_naming_the_bad_route(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text(BASE + 'routes = [{ when = \'.a\', to = ["crm", "hubspot", "nope"] }]\n')
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "$.transforms.contact.routes[0].to[2]: unknown sink 'nope' (routes send to sinks)" in err


def test_aggregate_and_enrich_do_not_combine() -> None:
    text = (
        BASE
        + 'aggregate = { key = ".k", max_events = 2 }\n'
        + 'enrich = { url = "http://127.0.0.1:9/x/{.id}", merge = ". + $lookup" }\n'
    )
    found = problems(text)
    assert "$.transforms.contact.aggregate: cannot be combined with `enrich`" in "\n".join(found), found
