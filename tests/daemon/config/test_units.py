"""Durations and sizes as users write them in the config, and the values they must refuse."""

from __future__ import annotations

import math

import pytest

from daemon.config.units import Duration, Size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("0ms", 0.0),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        (" 2 s ", 2.0),
        (10, 10.0),
        (0.25, 0.25),
    ],
)
def test_duration_parses_number_and_unit_to_seconds(text: object, seconds: float) -> None:
    duration = Duration.parse(text)
    assert isinstance(duration, Duration)
    assert duration == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "5", "ms", "5 weeks", "1S", "-1s", "1e3s", "1,5s", "5m30s", -1, -0.5, math.nan, math.inf],
)
def test_duration_rejects_malformed_negative_or_non_finite_values(text: object) -> None:
    with pytest.raises(ValueError, match=r"invalid duration|cannot be negative"):
        Duration.parse(text)


@pytest.mark.parametrize("value", [True, None, [1], {"s": 1}])
def test_duration_rejects_values_of_the_wrong_type(value: object) -> None:
    with pytest.raises(TypeError, match="expected a duration"):
        Duration.parse(value)


def test_duration_repr_shows_seconds() -> None:
    assert repr(Duration.parse("500ms")) == "Duration(0.5s)"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("100", 100),
        ("100B", 100),
        ("1KB", 1000),
        ("512KiB", 512 * 1024),
        ("10MB", 10_000_000),
        ("1MiB", 1024**2),
        ("2GB", 2_000_000_000),
        ("1GiB", 1024**3),
        (" 4 KiB ", 4096),
        (4096, 4096),
    ],
)
def test_size_parses_integer_and_unit_to_bytes(text: object, size: int) -> None:
    parsed = Size.parse(text)
    assert isinstance(parsed, Size)
    assert parsed == size


@pytest.mark.parametrize("text", ["", "MiB", "1.5MiB", "1 mib", "1TB", "-1", "1e6", -1])
def test_size_rejects_malformed_or_negative_values(text: object) -> None:
    with pytest.raises(ValueError, match=r"invalid size|cannot be negative"):
        Size.parse(text)


@pytest.mark.parametrize("value", [True, 1.5, None, ["1MiB"]])
def test_size_rejects_values_of_the_wrong_type(value: object) -> None:
    with pytest.raises(TypeError, match="expected a size"):
        Size.parse(value)
