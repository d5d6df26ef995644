"""The dead-letter reason of a sink's 3xx: where it pointed, with no user info or query."""

from __future__ import annotations

import pytest

from actors.sink.http import redirect_message

TAIL = " (not followed: point the sink's url there)"


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        ("https://api.example.com/v2/contacts", "https://api.example.com/v2/contacts"),
        ("https://u:secret@api.example.com:8443/x?sig=abc", "https://api.example.com:8443/x?…"),
        ("/v2/contacts/", "/v2/contacts/"),
        ("  https://example.com  ", "https://example.com"),
        ("https://example.com/" + "a" * 500, "https://example.com/" + "a" * 180),
    ],
)
def test_redirect_message_names_the_location_without_secrets(location: str, shown: str) -> None:
    assert redirect_message(301, location) == f"HTTP 301 redirect to {shown}{TAIL}"


def test_redirect_message_without_a_location() -> None:
    assert redirect_message(302, None) == "HTTP 302 redirect without a Location (not followed)"
