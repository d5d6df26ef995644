"""The listener's pure checks at the door: JSON depth on the bytes, framing, rate-limited logging."""

from __future__ import annotations

import logging

import pytest

from actors.webhook.door import ProtocolErrors, framing_error, too_deep


@pytest.mark.parametrize(
    ("body", "limit", "deep"),
    [
        (b"{}", 1, False),
        (b"[[]]", 1, True),
        (b"[[],[[]]]", 2, True),
        (b"[[],[[]]]", 3, False),
        (b"[" * 64 + b"]" * 64, 64, False),
        (b"[" * 65 + b"]" * 65, 64, True),
        (b'{"a":' * 65 + b"1" + b"}" * 65, 64, True),
        (b'{"a": [{"b": [1, 2, {"c": "x"}]}]}', 5, False),
        (b'{"a": [{"b": [1, 2, {"c": "x"}]}]}', 4, True),
        (b'["[[[[[[[[", "]]]]]", "{{{{"]', 1, False),  # brackets in strings do not count
        (b'["\\"[[[[", "\\\\", [[1]]]', 3, False),  # nor after escaped quotes and backslashes
        (b'["\\"[[[[", "\\\\", [[1]]]', 2, True),
        (b"42", 1, False),
        (b'{"items": [' + b"1," * 100_000 + b"1]}", 2, False),  # wide is not deep
    ],
)
def test_too_deep_counts_nesting_outside_strings(body: bytes, limit: int, deep: bool) -> None:
    assert too_deep(body, limit) is deep


def test_framing_error_names_content_length_with_transfer_encoding() -> None:
    both = [(b"content-length", b"4"), (b"transfer-encoding", b"chunked")]
    assert framing_error(both) is not None
    assert framing_error(both[:1]) is None
    assert framing_error(both[1:]) is None


def test_protocol_errors_log_one_line_per_interval_with_the_count_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    errors = ProtocolErrors(logging.getLogger("ferry.test.door"), 10.0, lambda: now[0])
    with caplog.at_level(logging.WARNING, "ferry.test.door"):
        for _ in range(5):
            errors.note("malformed_request", "malformed HTTP request: x")
        now[0] = 109.9
        errors.note("malformed_request", "malformed HTTP request: y")
        now[0] = 110.0
        errors.note("head_too_large", "request head larger than 1 bytes")
    assert [r.getMessage() for r in caplog.records] == [
        "webhook listener: malformed HTTP request: x (malformed_request)",
        "webhook listener: request head larger than 1 bytes (head_too_large); "
        "5 more since the last such line",
    ]
    assert errors.total == 7
    assert all(r.exc_info is None for r in caplog.records)
