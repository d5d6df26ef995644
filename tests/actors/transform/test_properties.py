"""Property tests of the inputs ferry does not control: config files and jq transform inputs.

- Config: a known-good config, mutated at random (a value replaced by any TOML value, a key
  removed or added, a table replaced), and arbitrary text. `parse` either returns a `Config` or
  raises `ConfigError` whose every problem names a path (`$…`); nothing else ever escapes.
- Transforms: any JSON event through a set of real programs (map, filter, routes, a program that
  errors on some inputs) gives outputs or a `Failure` with a message, never an exception, and
  one result per event.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.transform.config import TransformConfig
from actors.transform.program import Failure, TransformProgram
from daemon.config.root import Config, parse
from daemon.errors import ConfigError
from tests.depth import examples

SETTINGS = settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])

BASE: dict[str, Any] = {
    "store": {"path": "var/ferry.db", "durability": "full", "retention": "1h", "max_batch": 100},
    "listener": {"address": "127.0.0.1:8080", "max_body": "1MiB", "max_pending": 10, "idle_timeout": "60s"},
    "telemetry": {"metrics": False, "log_level": "info", "mask": ["email"]},
    "sources": {"demo": {"type": "webhook", "idempotency_header": "Idempotency-Key"}},
    "transforms": {"shape": {"inputs": ["demo"], "map": "{id: .id}", "filter": ".ok"}},
    "sinks": {
        "crm": {
            "type": "http",
            "inputs": ["shape"],
            "url": "http://127.0.0.1:9000/x",
            "concurrency": 4,
            "retry": {"max_attempts": 5, "initial_backoff": "100ms", "max_backoff": "5m"},
        },
        "file": {"type": "file", "inputs": ["demo"], "path": "out.jsonl"},
    },
}

toml_scalar = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.sampled_from(
        ["", "0s", "-1s", "1x", "5m", "1MiB", "99999999999d", "http://x", "demo", "crm", ".", "{"]
    ),
)
toml_value = st.recursive(
    toml_scalar,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(min_size=1, max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


def paths(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found.extend(paths(child, (*prefix, key)))
    return found


def toml_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "0.0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(item) for item in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_literal(v)}" for k, v in value.items()) + "}"


def to_toml(document: dict[str, Any]) -> str:
    """Every top-level key as `key = <inline value>`: valid TOML whatever the nesting."""
    return "\n".join(f"{toml_key(key)} = {toml_literal(value)}" for key, value in document.items()) + "\n"


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    document = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        where = draw(st.sampled_from(paths(document)))
        parent = document
        for key in where[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace":
            parent[where[-1]] = draw(toml_value)
        elif action == "remove":
            del parent[where[-1]]
        else:
            parent[draw(st.text(min_size=1, max_size=10))] = draw(toml_value)
        if not paths(document):
            break
    return document


def parse_or_error(text: str) -> Config | None:
    try:
        return parse(text, read_secrets=False)
    except ConfigError as exc:
        problems = exc.problems
    assert problems
    for problem in problems:
        assert isinstance(problem, str)
        assert problem.startswith("$"), problem
    return None


def test_the_base_config_is_valid() -> None:
    assert isinstance(parse_or_error(to_toml(BASE)), Config)


@given(mutated())
@SETTINGS
def test_a_mutated_config_is_valid_or_every_problem_has_its_path(document: dict[str, Any]) -> None:
    parse_or_error(to_toml(document))


@given(st.text(max_size=400))
@SETTINGS
def test_any_text_is_a_config_or_a_config_error(text: str) -> None:
    parse_or_error(text)


# -- transforms ---------------------------------------------------------------------------------

PROGRAMS = [
    TransformConfig(inputs=["demo"], map='{id: .id, name: (.first + " " + .last)}'),
    TransformConfig(inputs=["demo"], map=".items[]? | {sku: .sku}", filter='.type == "order"'),
    TransformConfig(inputs=["demo"], map="(.n / .d) | floor", filter=".n != null"),
    TransformConfig(inputs=["demo"], map="tostring | ascii_downcase | explode | length"),
    TransformConfig(inputs=["demo"], map='error("refused: \\(.)")', filter='type == "array"'),
]
json_event = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["id", "first", "last", "type", "items", "sku", "n", "d", "x"]),
            children,
            max_size=6,
        )
    ),
    max_leaves=15,
)


@given(st.sampled_from(range(len(PROGRAMS))), st.lists(json_event, min_size=1, max_size=8))
@SETTINGS
def test_any_event_through_a_transform_gives_outputs_or_a_failure_never_an_exception(
    index: int, events: list[Any]
) -> None:
    program = TransformProgram(PROGRAMS[index])
    payloads = [json.dumps(event).encode() for event in events]
    results = program.map(payloads)
    assert len(results) == len(payloads)
    for result in results:
        if isinstance(result, Failure):
            assert isinstance(result.message, str)
            assert result.message
        else:
            for routed in result:
                json.loads(routed.payload)
