"""The peer table's judging rule: which ferry configuration each target is judged on."""

from __future__ import annotations

from bench.peers import BATCHING, FLOOR, PER_EVENT, Figures, rows


def _figures(ingest: float, e2e: float) -> Figures:
    return Figures(ingest, 1.0, 2.0, 0, e2e, 100, 100, 50.0)


def _verdicts(results: dict[str, Figures], bare: float | None = None) -> dict[str, bool | None]:
    return {row.figure: row.passed for row in rows(results, bare) if " vs " in row.figure}


def test_ingest_targets_are_judged_on_the_batching_sink_and_end_to_end_on_per_event() -> None:
    results = {
        PER_EVENT: _figures(ingest=2_000, e2e=5_500),
        BATCHING: _figures(ingest=9_000, e2e=20_000),
        "Node-RED": _figures(ingest=2_000, e2e=2_500),
        "Huey relay": _figures(ingest=1_000, e2e=900),
    }
    verdicts = _verdicts(results, bare=14_000)
    assert verdicts[f"peers: {BATCHING} durable ingest vs Node-RED"] is True  # 4.5x >= 4x
    assert verdicts[f"peers: {PER_EVENT} durable ingest vs Node-RED"] is None  # shown, not judged
    assert verdicts[f"peers: {BATCHING} durable ingest vs Huey relay"] is True  # 9x >= 8x
    assert verdicts[f"peers: {PER_EVENT} end to end vs Node-RED"] is True  # 2.2x >= 2x (issue 16)
    assert verdicts[f"peers: {BATCHING} end to end vs Node-RED"] is None
    assert verdicts["peers: bare trio+h11 server (no work) vs Huey relay, for scale"] is None


def test_a_missed_target_fails_and_a_missing_peer_is_left_out() -> None:
    results = {
        PER_EVENT: _figures(ingest=2_000, e2e=4_500),
        BATCHING: _figures(ingest=7_000, e2e=20_000),
        "Node-RED": _figures(ingest=2_000, e2e=2_500),
    }
    verdicts = _verdicts(results)
    assert verdicts[f"peers: {BATCHING} durable ingest vs Node-RED"] is False  # 3.5x < 4x
    assert verdicts[f"peers: {PER_EVENT} end to end vs Node-RED"] is False  # 1.8x < 2x
    assert not any("Huey" in figure for figure in verdicts)
    assert not any("bare" in figure for figure in verdicts)  # no bare figure measured


def test_the_designs_floor_is_shown_end_to_end_only_and_never_judged() -> None:
    results = {
        PER_EVENT: _figures(ingest=2_000, e2e=2_000),
        FLOOR: _figures(ingest=2_500, e2e=2_600),
        "Node-RED": _figures(ingest=2_000, e2e=2_500),
    }
    verdicts = _verdicts(results)
    assert verdicts[f"peers: {FLOOR} end to end vs Node-RED"] is None  # the ceiling, for scale
    assert f"peers: {FLOOR} durable ingest vs Node-RED" not in verdicts
    assert verdicts[f"peers: {PER_EVENT} end to end vs Node-RED"] is False  # 0.8x: still judged
