"""The load-time checks of `daemon.config.sanity` and `daemon.config.url_credentials`, table-driven."""

from __future__ import annotations

import pytest

from daemon.config.sanity import MAX_DEPTH, depth_error
from daemon.config.url_credentials import redact_url, url_secrets


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"a": [1, {"b": 2}]}, None),
        ({"a": [[]] * 3}, None),
        ({"a": {"b": {"c": {"d": 1}}}}, None),
    ],
)
def test_shallow_toml_passes(raw: object, expected: str | None) -> None:
    assert depth_error(raw) == expected


def test_deep_toml_is_named_by_its_setting() -> None:
    deep: object = 1
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    message = f"nested more than {MAX_DEPTH} levels deep"
    assert depth_error({"store": {"path": deep}}) == f"$.store.path[0]: {message}"
    assert depth_error({"x": deep}) == f"$.x[0][0]: {message}"
    assert depth_error({"x": [deep]}) == f"$.x[0][0]: {message}"


@pytest.mark.parametrize(
    ("url", "secrets", "shown"),
    [
        ("http://host/x", [], "http://host/x"),
        ("http://host/x?mail=a@b", [], "http://host/x?mail=a@b"),
        ("http://u:p%40ss@host/x", ["u:p%40ss", "p%40ss", "p@ss", "dTpwQHNz"], "http://***@host/x"),
        ("https://token@host", ["token", "dG9rZW46"], "https://***@host"),
    ],
)
def test_url_credentials(url: str, secrets: list[str], shown: str) -> None:
    assert sorted(url_secrets(url)) == sorted(secrets)
    assert redact_url(url) == shown
