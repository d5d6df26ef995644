"""`mask(value, rules)`: table-driven, plus the redactor's scrubbing of free text and secrets."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from daemon.config.root import parse
from daemon.errors import ConfigError
from daemon.telemetry.masking import (
    MASKED,
    Redactor,
    compile_rules,
    config_redactor,
    mask,
    masked_values,
    redact_headers,
)

PERSON = {
    "email": "ann@example.com",
    "name": "Ann",
    "card": {"number": "4111111111111111", "expiry": "12/30"},
    "contacts": [{"email": "bob@example.com", "ssn": 123456789}, {"phone": "555"}],
    "meta": {"card": {"number": "not-the-root-card"}},
}

CASES: list[tuple[str, list[str], Any, Any]] = [
    ("no rules: unchanged", [], PERSON, PERSON),
    ("scalar payload", ["email"], "ann@example.com", "ann@example.com"),
    ("null payload", ["email"], None, None),
    ("bare name at the top", ["name"], {"name": "Ann", "x": 1}, {"name": MASKED, "x": 1}),
    (
        "bare name at any depth, in lists too",
        ["email"],
        {"email": "a", "deep": {"deeper": [{"email": "b"}, {"other": "c"}]}},
        {"email": MASKED, "deep": {"deeper": [{"email": MASKED}, {"other": "c"}]}},
    ),
    ("bare name: any case", ["email"], {"Email": "a", "EMAIL": "b"}, {"Email": MASKED, "EMAIL": MASKED}),
    ("bare name masks a whole object", ["card"], {"card": {"number": "1"}}, {"card": MASKED}),
    (
        "numbers and nulls become ***",
        ["ssn"],
        {"ssn": 123, "x": {"ssn": None}},
        {"ssn": MASKED, "x": {"ssn": MASKED}},
    ),
    (
        "path masks one place only",
        ["$.card.number"],
        {"card": {"number": "1", "expiry": "2"}, "meta": {"card": {"number": "3"}}},
        {"card": {"number": MASKED, "expiry": "2"}, "meta": {"card": {"number": "3"}}},
    ),
    ("path is case-sensitive", ["$.card.number"], {"Card": {"number": "1"}}, {"Card": {"number": "1"}}),
    ("path to a missing key", ["$.card.number"], {"card": "x"}, {"card": "x"}),
    (
        "path through a list",
        ["$.cards.number"],
        {"cards": [{"number": 1}, {"number": 2, "k": 3}]},
        {"cards": [{"number": MASKED}, {"number": MASKED, "k": 3}]},
    ),
    (
        "path of one key",
        ["$.name"],
        {"name": "Ann", "x": {"name": "Bob"}},
        {"name": MASKED, "x": {"name": "Bob"}},
    ),
    ("shorter path wins", ["$.card.number", "$.card"], {"card": {"number": "1"}}, {"card": MASKED}),
    (
        "shorter path wins in any order",
        ["$.card", "$.card.number"],
        {"card": {"number": "1"}},
        {"card": MASKED},
    ),
    (
        "two paths share a prefix",
        ["$.a.b", "$.a.c"],
        {"a": {"b": 1, "c": 2, "d": 3}},
        {"a": {"b": MASKED, "c": MASKED, "d": 3}},
    ),
    ("top-level list", ["email"], [{"email": "a"}, 1, "email"], [{"email": MASKED}, 1, "email"]),
    (
        "the issue's example",
        ["email", "ssn", "$.card.number"],
        PERSON,
        {
            "email": MASKED,
            "name": "Ann",
            "card": {"number": MASKED, "expiry": "12/30"},
            "contacts": [{"email": MASKED, "ssn": MASKED}, {"phone": "555"}],
            "meta": {"card": {"number": "not-the-root-card"}},
        },
    ),
]


@pytest.mark.parametrize(("rules", "value", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mask(rules: list[str], value: Any, expected: Any) -> None:
    before = copy.deepcopy(value)
    assert mask(value, compile_rules(rules)) == expected
    assert value == before  # the input is never changed


def test_no_rules_return_the_same_object() -> None:
    assert mask(PERSON, compile_rules([])) is PERSON


@pytest.mark.parametrize("rule", ["", "$", "$.", "$.a..b", "a.b", "$a", "two words", ".a"])
def test_invalid_rules_are_refused(rule: str) -> None:
    with pytest.raises(ValueError, match="invalid mask rule"):
        compile_rules([rule])
    with pytest.raises(ConfigError, match=r"\$\.telemetry\.mask\[0\]"):
        parse(f"[telemetry]\nmask = [{rule!r}]\n")


def test_config_accepts_names_and_paths() -> None:
    config = parse('[telemetry]\nmask = ["email", "ssn", "$.card.number", "$.x-y.z_1"]\n')
    assert config.telemetry.mask == ["email", "ssn", "$.card.number", "$.x-y.z_1"]


def test_masked_values_lists_what_is_hidden_longest_first() -> None:
    rules = compile_rules(["email", "ssn", "$.card"])
    assert masked_values(PERSON, rules) == [
        "4111111111111111",
        "ann@example.com",
        "bob@example.com",
        "123456789",
        "12/30",
    ]
    assert masked_values(PERSON, compile_rules([])) == []


def test_redactor_scrubs_masked_values_and_secrets_from_free_text() -> None:
    redactor = Redactor.build(["email"], secrets=["Bearer s3cret", ""])
    payload = {"email": "ann@example.com"}
    text = 'HTTP 422: {"error": "ann@example.com is taken", "auth": "Bearer s3cret"}'
    assert redactor.scrub(text, payload) == 'HTTP 422: {"error": "*** is taken", "auth": "***"}'
    assert redactor.scrub(None, payload) is None
    assert redactor.mask({"email": "x", "note": "key Bearer s3cret"}) == {"email": MASKED, "note": "key ***"}


def test_secret_headers_are_redacted_whatever_their_case() -> None:
    headers = [
        ("Authorization", "Bearer x"),
        ("proxy-authorization", "Basic y"),
        ("Cookie", "sid=1"),
        ("X-API-Key", "k"),
        ("x-tenant-token", "t"),
        ("content-type", "application/json"),
    ]
    assert redact_headers(headers, configured=["X-Tenant-Token"]) == [
        ("Authorization", MASKED),
        ("proxy-authorization", MASKED),
        ("Cookie", MASKED),
        ("X-API-Key", MASKED),
        ("x-tenant-token", MASKED),
        ("content-type", "application/json"),
    ]


def test_log_lines_mask_payload_fields_and_scrub_secrets() -> None:
    import json
    import logging

    from daemon.telemetry.logs import JsonFormatter

    formatter = JsonFormatter(Redactor.build(["email", "$.card.number"], secrets=["tok-123"]))
    record = logging.LogRecord("ferry.test", logging.WARNING, __file__, 1, "sent with tok-123", None, None)
    record.fields = {
        "payload": {"email": "a@b", "card": {"number": "4111"}},
        "error": "auth tok-123",
        "email": "x",
    }
    line = json.loads(formatter.format(record))
    assert line["msg"] == "sent with ***"
    assert line["payload"] == {"email": MASKED, "card": {"number": MASKED}}  # paths from the payload's root
    assert line["error"] == "auth ***"
    assert line["email"] == MASKED


@pytest.mark.parametrize(
    ("secret", "text", "expected"),
    [
        ("v", "delivery v failed", "delivery *** failed"),
        ("v", "v.", "***."),
        ("e", "every level", "every level"),
        ("pw7", "http://u:pw7@h", "http://u:***@h"),
        ("pw7", "pw7x xpw7", "pw7x xpw7"),
        ("long-secret", "xlong-secretx", "x***x"),  # 8 characters or more: replaced anywhere
        ("3", "age 3, 13 left", "age ***, 13 left"),
    ],
)
def test_a_short_secret_is_scrubbed_only_as_a_whole_word(secret: str, text: str, expected: str) -> None:
    assert Redactor.build([], [secret]).scrub(text) == expected
    assert Redactor.build([], [secret]).mask({"note": text}) == {"note": expected}


def test_a_short_masked_value_is_scrubbed_only_as_a_whole_word() -> None:
    redactor = Redactor.build(["age"])
    assert redactor.scrub("age 3 is not 13 or 30", {"age": 3}) == "age *** is not 13 or 30"


def test_only_secret_headers_of_a_sink_are_secrets() -> None:
    config = parse(
        '[sources.s]\ntype = "webhook"\n[sinks.k]\ntype = "http"\ninputs = ["s"]\n'
        'url = "http://ferry:pw@127.0.0.1:9/x"\n'
        'headers = { Accept = "application/json", "X-Source" = "v", "X-Auth-Token" = "t0k", '
        'Authorization = "Bearer abc" }\n'
    )
    secrets = set(config_redactor(config).secrets)
    assert {"t0k", "Bearer abc", "ferry:pw", "pw"} <= secrets
    assert not {"application/json", "v"} & secrets
