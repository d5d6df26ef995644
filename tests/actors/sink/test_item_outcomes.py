"""Per-item outcomes of a batch answer: the presets on the real shapes, custom programs, every
answer that cannot be read, and `ferry check` on the table."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from actors.sink.config import HttpSinkConfig
from actors.sink.items import ItemOutcomes, UnreadableAnswer, scrubbed_items
from actors.sink.items_config import ItemOutcomesConfig
from daemon.config.root import parse
from daemon.errors import ConfigError, PermanentDelivery, RetryableDelivery
from daemon.telemetry import masking


def payloads(*items: dict[str, Any]) -> list[bytes]:
    return [json.dumps(item).encode() for item in items]


def outcomes(found: dict[int, Any]) -> dict[int, tuple[str, int | None]]:
    """Each refused item as (retry | dead, status)."""
    return {
        index: ("dead" if isinstance(error, PermanentDelivery) else "retry", error.status)
        for index, error in found.items()
    }


def hubspot_error(category: str, message: str, **context: list[str]) -> dict[str, Any]:
    return {"status": "error", "category": category, "message": message, "context": context}


CONTACTS = payloads(
    {"idProperty": "email", "id": "a@x.io", "objectWriteTraceId": "t-a", "properties": {}},
    {"idProperty": "email", "id": "b@x.io", "objectWriteTraceId": "t-b", "properties": {}},
    {"idProperty": "email", "id": "c@x.io", "objectWriteTraceId": "t-c", "properties": {}},
)
BY_ID = payloads({"id": "a@x.io"}, {"id": "b@x.io"}, {"id": "c@x.io"})
THREE = payloads({}, {}, {})


@pytest.mark.parametrize(
    ("preset", "answer", "items", "expected"),
    [
        pytest.param(
            "hubspot",
            {  # HubSpot's documented multi-status answer (error handling, "Multi-status errors")
                "status": "COMPLETE",
                "results": [{"id": "1145814089", "properties": {}}],
                "numErrors": 1,
                "errors": [
                    hubspot_error(
                        "VALIDATION_ERROR", 'Property "missing" does not exist', objectWriteTraceId=["t-b"]
                    )
                ],
            },
            CONTACTS,
            {1: ("dead", 400)},
            id="hubspot-207-objectWriteTraceId",
        ),
        pytest.param(
            "hubspot",
            {
                "status": "COMPLETE",
                "results": [],
                "errors": [hubspot_error("CONFLICT", "exists", ids=["c@x.io"])],
            },
            BY_ID,
            {2: ("dead", 409)},
            id="hubspot-context-ids",
        ),
        pytest.param(
            "hubspot",
            {
                "status": "COMPLETE",
                "errors": [
                    hubspot_error("RATE_LIMITS", "slow down", objectWriteTraceId=["t-a"]),
                    hubspot_error("SOMETHING_NEW", "?", objectWriteTraceId=["t-c"]),
                ],
            },
            CONTACTS,
            {0: ("retry", 429), 2: ("retry", 500)},
            id="hubspot-retryable-and-unknown-categories",
        ),
        pytest.param(
            "hubspot",
            {"status": "COMPLETE", "results": [{}, {}, {}]},
            CONTACTS,
            {},
            id="hubspot-200-no-errors",
        ),
        pytest.param(
            "hubspot",
            {
                "errors": [
                    hubspot_error("VALIDATION_ERROR", "bad phone", objectWriteTraceId=["t-a", "t-b"]),
                    hubspot_error("OBJECT_NOT_FOUND", "gone", objectWriteTraceId=["t-b"]),
                ]
            },
            CONTACTS,
            {0: ("dead", 400), 1: ("dead", 400)},
            id="hubspot-one-error-many-inputs",
        ),
        pytest.param(
            "jsonapi",
            {
                "data": [{}, {}],
                "errors": [
                    {
                        "status": "422",
                        "title": "Invalid Attribute",
                        "source": {"pointer": "/data/2/attributes/x"},
                    },
                    {"status": "503", "detail": "busy", "source": {"pointer": "/data/0"}},
                ],
            },
            THREE,
            {2: ("dead", 422), 0: ("retry", 503)},
            id="jsonapi-pointers",
        ),
        pytest.param("jsonapi", {"data": [{}, {}, {}]}, THREE, {}, id="jsonapi-no-errors"),
        pytest.param(
            "elasticsearch",
            {
                "took": 30,
                "errors": True,
                "items": [
                    {"index": {"_id": "1", "status": 201, "result": "created"}},
                    {
                        "create": {
                            "_id": "2",
                            "status": 409,
                            "error": {"type": "version_conflict_engine_exception"},
                        }
                    },
                    {
                        "update": {
                            "_id": "3",
                            "status": 429,
                            "error": {"type": "es_rejected_execution_exception"},
                        }
                    },
                ],
            },
            THREE,
            {1: ("dead", 409), 2: ("retry", 429)},
            id="elasticsearch-bulk",
        ),
        pytest.param(
            "elasticsearch",
            {"errors": False, "items": [{"index": {"status": 200}}] * 3},
            THREE,
            {},
            id="elasticsearch-no-errors",
        ),
        pytest.param(
            "elasticsearch",
            {"items": [{"index": {"status": 200}}, {"index": {"status": 400, "error": {"type": "x"}}}, {}]},
            THREE,
            {1: ("dead", 400)},
            id="elasticsearch-without-its-flag-reads-every-item",
        ),
        pytest.param("hubspot", {"errors": []}, CONTACTS, {}, id="hubspot-empty-errors"),
    ],
)
def test_presets_read_the_real_shapes(
    preset: str, answer: Any, items: list[bytes], expected: dict[int, tuple[str, int]]
) -> None:
    reader = ItemOutcomes(ItemOutcomesConfig(preset=preset))  # type: ignore[arg-type]
    assert outcomes(reader.read(json.dumps(answer).encode(), items)) == expected


def test_a_refused_item_carries_its_reason() -> None:
    reader = ItemOutcomes(ItemOutcomesConfig(preset="hubspot"))
    answer = {"errors": [hubspot_error("VALIDATION_ERROR", "Property values were not valid", ids=["b@x.io"])]}
    (error,) = reader.read(json.dumps(answer).encode(), BY_ID).values()
    assert str(error) == "item refused (HTTP 400): VALIDATION_ERROR: Property values were not valid"


@pytest.mark.parametrize(
    ("failed", "item_key", "expected"),
    [
        ('.failed[] | {index: .i, status: .s, reason: "no"}', None, {0: ("dead", 400), 2: ("retry", 503)}),
        (".failed[] | {key: .k, status: .s}", ".ref", {1: ("dead", 404)}),
        ('.failed[] | {index: .i, status: "422"}', None, {0: ("dead", 422), 2: ("dead", 422)}),
        (".failed[] | {index: .i}", None, {0: ("retry", None), 2: ("retry", None)}),
        (".failed[] | {index: .i, status: 200}", None, {}),
        ("empty", None, {}),
    ],
)
def test_custom_programs(
    failed: str, item_key: str | None, expected: dict[int, tuple[str, int | None]]
) -> None:
    reader = ItemOutcomes(ItemOutcomesConfig(failed=failed, item_key=item_key))
    answer = {"failed": [{"i": 0, "s": 400, "k": "r2"}, {"i": 2, "s": 503, "k": "r2"}]}
    if "{key:" in failed:
        answer = {"failed": [{"k": "r2", "s": 404}]}
    items = payloads({"ref": "r1"}, {"ref": "r2"}, {"ref": "r3"})
    assert outcomes(reader.read(json.dumps(answer).encode(), items)) == expected


def test_an_item_named_twice_takes_the_worst_outcome_and_every_reason() -> None:
    reader = ItemOutcomes(ItemOutcomesConfig(failed=".e[]"))
    answer = {
        "e": [{"index": 1, "status": 503, "reason": "busy"}, {"index": 1, "status": 400, "reason": "bad"}]
    }
    found = reader.read(json.dumps(answer).encode(), THREE)
    assert outcomes(found) == {1: ("dead", 400)}
    assert str(found[1]) == "item refused (HTTP 400): busy; bad"


@pytest.mark.parametrize(
    ("failed", "body", "why"),
    [
        (".e[]", b"<html>502 Bad Gateway</html>", "the answer is not JSON"),
        (".e[]", b'{"e": [', "the answer is not JSON"),
        (".e[]", b'{"e": 3}', "the item_outcomes program failed: "),
        ('error("boom")', b"{}", "the item_outcomes program failed: boom"),
        (".e[]", b'{"e": [{"index": 3}]}', "item index 3 is outside the batch of 3"),
        (".e[]", b'{"e": [{"index": -1}]}', "item index -1 is outside the batch of 3"),
        (".e[]", b'{"e": [{"index": "1"}]}', "item index '1' is outside the batch of 3"),
        (".e[]", b'{"e": [{"index": 1.5}]}', "item index 1.5 is outside the batch of 3"),
        (".e[]", b'{"e": [{"status": 400}]}', "an entry names no item (no index, no key)"),
        (".e[]", b'{"e": ["oops"]}', "an entry is not an object"),
        (".e[]", b'{"e": [{"index": 0, "status": "soon"}]}', "status 'soon' is not a number"),
        (".e[]", b'{"e": [{"index": 0, "status": 99}]}', "status 99 is not an HTTP status"),
        (".e[]", b'{"e": [{"key": "x"}]}', "an entry names an item by key, but no item_key"),
    ],
)
def test_an_answer_that_cannot_be_read_says_why(failed: str, body: bytes, why: str) -> None:
    reader = ItemOutcomes(ItemOutcomesConfig(failed=failed))
    with pytest.raises(UnreadableAnswer, match="^" + re.escape(why)):
        reader.read(body, THREE)


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("nobody", "item key 'nobody' matches no item of the batch"),
        ("twice", "item key 'twice' matches 2 items of the batch"),
    ],
)
def test_a_key_must_name_exactly_one_item(key: str, why: str) -> None:
    reader = ItemOutcomes(ItemOutcomesConfig(failed=".e[]", item_key=".ref"))
    items = payloads({"ref": "twice"}, {"ref": "twice"}, {"other": 1})
    with pytest.raises(UnreadableAnswer, match=why):
        reader.read(json.dumps({"e": [{"key": key, "status": 400}]}).encode(), items)


def test_an_empty_answer_reads_as_null() -> None:
    for preset in ("hubspot", "jsonapi", "elasticsearch"):
        assert ItemOutcomes(ItemOutcomesConfig(preset=preset)).read(b"", THREE) == {}
    with pytest.raises(UnreadableAnswer, match="program failed"):
        ItemOutcomes(ItemOutcomesConfig(failed=".e[]")).read(b"  ", THREE)


def test_item_errors_are_classified_like_a_single_request() -> None:
    reader = ItemOutcomes(ItemOutcomesConfig(failed=".[] | {index: .[0], status: .[1]}"))
    statuses = [408, 425, 429, 500, 503, 400, 401, 404, 409, 422, 302]
    classes = {}
    for status in statuses:
        found = reader.read(json.dumps([[0, status]]).encode(), THREE)
        classes[status] = type(found[0])
    assert {s for s, kind in classes.items() if kind is RetryableDelivery} == {408, 425, 429, 500, 503}
    assert {s for s, kind in classes.items() if kind is PermanentDelivery} == {400, 401, 404, 409, 422, 302}


SINK = """
[sources.s]
type = "webhook"

[sinks.crm]
type = "http"
inputs = ["s"]
url = "http://127.0.0.1:9/batch"
batch = {{ max_items = 10, item_outcomes = {table} }}
"""


def test_the_table_loads_with_a_preset_or_a_program() -> None:
    sink = parse(SINK.format(table='{ preset = "hubspot", item_key = ".properties.email" }')).sinks["crm"]
    assert isinstance(sink, HttpSinkConfig)
    assert sink.batch is not None
    assert sink.batch.item_outcomes is not None
    assert sink.batch.item_outcomes.programs()[1] == ".properties.email"
    parse(SINK.format(table="{ failed = '.errors[] | {index: .i, status: 400}' }"))


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("{ failed = '.errors[' }", "$.sinks.crm.batch.item_outcomes.failed: invalid jq program"),
        (
            "{ failed = '.e[]', item_key = '.id |' }",
            "$.sinks.crm.batch.item_outcomes.item_key: invalid jq program",
        ),
        (
            '{ preset = "hubspot", item_key = "][" }',
            "$.sinks.crm.batch.item_outcomes.item_key: invalid jq program",
        ),
        ('{ preset = "hubspot", failed = ".e[]" }', "$.sinks.crm.batch.item_outcomes: give either `preset`"),
        ("{ }", "$.sinks.crm.batch.item_outcomes: give either `preset`"),
        ('{ preset = "salesforce" }', "$.sinks.crm.batch.item_outcomes.preset"),
        ('{ preset = "hubspot", fail = ".e" }', "$.sinks.crm.batch.item_outcomes.fail: unknown key"),
    ],
)
def test_a_bad_table_is_a_config_error_naming_its_path(table: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(SINK.format(table=table))
    assert any(problem.startswith(expected) for problem in info.value.problems), info.value.problems


def test_refusal_reasons_are_scrubbed_of_masked_values_and_secrets() -> None:
    items = {
        0: PermanentDelivery(
            "item refused (HTTP 400): Email address ada@x.io is invalid (key tok-1)", status=400
        ),
        1: RetryableDelivery("item refused (HTTP 503): busy", status=503),
    }
    redactor = masking.Redactor.build(["email"], secrets=["tok-1"])
    found = scrubbed_items(items, payloads({"email": "ada@x.io"}, {"email": "b@x.io"}), redactor)
    assert str(found[0]) == "item refused (HTTP 400): Email address *** is invalid (key ***)"
    assert (type(found[0]), found[0].status) == (PermanentDelivery, 400)
    assert found[1] is items[1]
