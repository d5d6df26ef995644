"""The pure transform programs: schema validation, jq, routes, group keys and reduction."""

from __future__ import annotations

import json
from typing import Any

import pytest

from actors.transform.config import AggregateConfig, RouteConfig, TransformConfig
from actors.transform.program import Failure, Keyed, Routed, TransformProgram, every

CONTACT = {
    "type": "object",
    "required": ["email", "age"],
    "properties": {
        "email": {"type": "string", "format": "email"},
        "age": {"type": "integer", "minimum": 0},
        "updated": {"type": "string", "format": "date-time"},
    },
}


def program(**fields: Any) -> TransformProgram:
    return TransformProgram(TransformConfig(inputs=["src"], **fields))


def encoded(*events: Any) -> list[bytes]:
    return [json.dumps(event).encode() for event in events]


def test_valid_events_pass_and_invalid_ones_list_every_violation() -> None:
    transform = program(schema=CONTACT, map="{email}")
    good, bad, worse = transform.map(
        encoded(
            {"email": "ada@example.com", "age": 36},
            {"email": "nope", "age": -1},
            {"updated": "yesterday", "age": "old"},
        )
    )
    assert good == [Routed(b'{"email":"ada@example.com"}', None)]
    assert bad == Failure(
        "schema: 2 violation(s): $.age: -1 is less than the minimum of 0; $.email: 'nope' is not a 'email'"
    )
    assert isinstance(worse, Failure)
    assert worse.message.startswith("schema: 3 violation(s): ")
    assert "$: 'email' is a required property" in worse.message
    assert "$.age: 'old' is not of type 'integer'" in worse.message
    assert "$.updated: 'yesterday' is not a 'date-time'" in worse.message


def test_schema_from_a_file(tmp_path: Any) -> None:
    path = tmp_path / "contact.json"
    path.write_text(json.dumps(CONTACT))
    [result] = program(schema=str(path)).map(encoded({"email": "a@b.c"}))
    assert result == Failure("schema: 1 violation(s): $: 'age' is a required property")


def test_long_violation_messages_are_cut() -> None:
    [result] = program(schema={"type": "string"}).map(encoded({"x": "y" * 5000}))
    assert isinstance(result, Failure)
    assert len(result.message) < 300
    assert result.message.endswith("…")


def test_jq_error_fails_only_its_event() -> None:
    results = program(map=".a + 1").map(encoded({"a": 1}, {"a": "x"}, {"a": 2}))
    assert results[0] == [Routed(b"2", None)]
    assert isinstance(results[1], Failure)
    assert results[1].message.startswith("jq: ")
    assert "cannot be added" in results[1].message
    assert results[2] == [Routed(b"3", None)]


def test_invalid_utf8_fails_its_event() -> None:
    [result] = program().map([b'"\xff"'])
    assert isinstance(result, Failure)
    assert "not UTF-8" in result.message


ROUTES = [
    RouteConfig(when='.type == "lead"', to=["crm"]),
    RouteConfig(when='.type == "contact"', to=["hubspot", "crm"]),
    RouteConfig(when=".vip", to=["vip"]),
]


@pytest.mark.parametrize(
    ("event", "sinks"),
    [
        ({"type": "lead"}, ("crm",)),
        ({"type": "contact"}, ("hubspot", "crm")),
        ({"type": "contact", "vip": True}, ("hubspot", "crm")),  # the first match wins
        ({"type": "other", "vip": True}, ("vip",)),
        ({"type": "other"}, ("audit",)),  # no match: the default route
        ({"type": "other", "vip": None}, ("audit",)),  # null is false
    ],
)
def test_routes_pick_the_first_matching_route(event: Any, sinks: tuple[str, ...]) -> None:
    [outputs] = program(routes=ROUTES, default_route=["audit"]).map(encoded(event))
    assert outputs == [Routed(json.dumps(event, separators=(",", ":")).encode(), sinks)]


def test_routes_see_the_mapped_output_and_each_output_routes_alone() -> None:
    transform = program(map=".items[]", routes=ROUTES[:1])
    [outputs] = transform.map(encoded({"items": [{"type": "lead"}, {"type": "other"}]}))
    assert outputs == [Routed(b'{"type":"lead"}', ("crm",)), Routed(b'{"type":"other"}', ())]


def test_a_route_predicate_error_fails_the_event() -> None:
    [result] = program(routes=[RouteConfig(when=".n > (.limit | tonumber)", to=["crm"])]).map(
        encoded({"n": 1, "limit": "x"})
    )
    assert isinstance(result, Failure)
    assert result.message.startswith("jq: ")


def test_items_carry_their_group_key_as_json() -> None:
    transform = program(aggregate=AggregateConfig(key=".category", max_events=2))
    [outputs, bad] = transform.items(encoded({"category": "a", "n": 1}, {"category": ["x"]}))
    assert outputs == [Keyed(b'{"category":"a","n":1}', '"a"')]
    assert bad == [Keyed(b'{"category":["x"]}', '["x"]')]


def test_a_key_that_is_not_one_value_fails_the_event() -> None:
    transform = program(aggregate=AggregateConfig(key=".tags[]", max_events=2))
    [none, two] = transform.items(encoded({"tags": []}, {"tags": [1, 2]}))
    assert none == Failure("aggregate key: gave 0 values for one output; it must give one")
    assert two == Failure("aggregate key: gave 2 values for one output; it must give one")


def test_reduce_gets_the_window_as_an_array_and_routes_its_output() -> None:
    transform = program(
        aggregate=AggregateConfig(
            key=".category", max_events=3, reduce="{category: .[0].category, total: (map(.n) | add)}"
        ),
        routes=[RouteConfig(when=".total > 10", to=["big"])],
        default_route=["small"],
    )
    items = [b'{"category":"a","n":4}', b'{"category":"a","n":9}']
    assert transform.reduce(items) == [Routed(b'{"category":"a","total":13}', ("big",))]
    assert transform.reduce(items[:1]) == [Routed(b'{"category":"a","total":4}', ("small",))]


def test_reduce_errors_and_several_outputs_are_failures() -> None:
    broken = program(aggregate=AggregateConfig(key=".k", max_events=3, reduce="map(.n) | add + 1"))
    result = broken.reduce([b'{"n":"x"}'])
    assert isinstance(result, Failure)
    assert result.message.startswith("jq: ")
    several = program(aggregate=AggregateConfig(key=".k", max_events=3, reduce=".[]"))
    assert several.reduce([b"1", b"2"]) == Failure(
        "aggregate reduce: gave more than one output for one window; it must give one"
    )
    assert program(aggregate=AggregateConfig(key=".k", max_events=3, reduce="empty")).reduce([b"1"]) == []


# --- bounded fan-out -------------------------------------------------------------------------


def test_an_event_past_max_outputs_fails_and_jq_is_stopped_while_it_yields() -> None:
    bounded = program(map=".items[]", max_outputs=3)
    three, four = bounded.map(encoded({"items": [1, 2, 3]}, {"items": [1, 2, 3, 4]}))
    assert not isinstance(three, Failure)
    assert [json.loads(routed.payload) for routed in three] == [1, 2, 3]
    assert four == Failure("map produced more than 3 outputs for one event (max_outputs)")
    # an endless generator ends too: jq stops at the 4th output rather than building them all
    (endless,) = program(map="repeat(1)", max_outputs=3).map(encoded({}))
    assert endless == Failure("map produced more than 3 outputs for one event (max_outputs)")
    (keyed,) = program(map=".[]", max_outputs=2, aggregate=AggregateConfig(key=".")).items(encoded([1, 2, 3]))
    assert isinstance(keyed, Failure)


def test_a_batch_stops_after_the_event_that_brings_it_to_batch_outputs() -> None:
    fan = program(map="range(.n)")
    payloads = encoded(*({"n": 4000} for _ in range(5)))
    first = fan.map(payloads)
    assert [len(result) for result in first] == [4000] * 3
    everything = every(fan.map, payloads)
    assert [len(result) for result in everything] == [4000] * 5
    small = fan.map(encoded(*({"n": 1} for _ in range(2000))))
    assert len(small) == 2000  # the common case: one jq run for the whole batch


def test_events_after_one_past_max_outputs_keep_their_own_outputs() -> None:
    """jq starts again after the event that passed the bound: the next events' outputs are theirs."""
    bounded = program(map=".items[]", max_outputs=2)
    results = bounded.map(encoded({"items": [1]}, {"items": [1, 2, 3]}, {"items": [7, 8]}, {"items": []}))
    assert [r if isinstance(r, Failure) else [json.loads(x.payload) for x in r] for r in results] == [
        [1],
        Failure("map produced more than 2 outputs for one event (max_outputs)"),
        [7, 8],
        [],
    ]


def test_outputs_that_look_like_the_end_marker_stay_outputs() -> None:
    """The end-of-event marker holds a random nonce: no output a sender shapes can end an event early."""
    fan = program(map=".[]")
    forged = ["\u0000ferry-end-", "\u0000ferry-end-" + "0" * 32, "ferry-end"]
    results = fan.map(encoded(forged, [1]))
    assert [[json.loads(x.payload) for x in r] for r in results if not isinstance(r, Failure)] == [
        forged,
        [1],
    ]
