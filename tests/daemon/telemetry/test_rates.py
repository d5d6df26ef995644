"""Throughput: rates from sampled counters, table-driven on given times."""

from __future__ import annotations

import pytest

from daemon.telemetry.throughput import Throughput


def feed(samples: list[tuple[float, int, int]], window: float = 60.0) -> Throughput:
    values = iter([(r, d) for _, r, d in samples])
    throughput = Throughput(lambda: next(values), interval=5.0, window=window)
    for at, _, _ in samples:
        throughput.sample(at)
    return throughput


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        pytest.param([], (None, None), id="no-samples"),
        pytest.param([(0.0, 10, 5)], (None, None), id="one-sample"),
        pytest.param([(0.0, 0, 0), (5.0, 50, 25)], (10.0, 5.0), id="steady"),
        pytest.param([(0.0, 0, 0), (5.0, 50, 40), (10.0, 100, 0)], (10.0, 4.0), id="reset"),
        pytest.param([(0.0, 7, 7), (5.0, 7, 7)], (0.0, 0.0), id="idle"),
    ],
)
def test_rates(samples: list[tuple[float, int, int]], expected: tuple[float | None, float | None]) -> None:
    assert feed(samples).rates() == expected


def test_only_the_last_window_counts() -> None:
    samples = [(0.0, 0, 0), (5.0, 1000, 0)] + [(5.0 + 5 * i, 1000 + 10 * i, 0) for i in range(1, 13)]
    received, _ = feed(samples, window=60.0).rates()
    assert received == pytest.approx(2.0)
