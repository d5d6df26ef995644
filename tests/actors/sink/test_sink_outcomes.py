"""Confirmation: each attempt's latency and answer are stored; one log line per final outcome."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import trio

from actors.sink.judge import Answer
from actors.sink.outcomes import IDS_PER_LINE, log_committed, log_final_outcomes, outcome_log
from actors.sink.sink import Sink
from daemon.errors import PermanentDelivery
from daemon.store.outbox import Due, Outcomes
from daemon.store.schema import DEAD, DELIVERED
from daemon.store.sqlite import Store
from tests.actors.sink.test_sink import RETRY, FakeSender, ingest


class AnsweringSender(FakeSender):
    """Answers 201 with a body naming the payload, after a measurable pause."""

    async def send(self, batch: Sequence[Due]) -> int | Answer | None:  # type: ignore[override]
        await super().send(batch)
        await trio.sleep(0.02)
        return Answer(201, json.dumps({"created": json.loads(batch[0].payload)}))


async def test_latency_and_response_of_the_last_attempt_are_stored(store: Store) -> None:
    sender = AnsweringSender({"bad": [PermanentDelivery("HTTP 422: no", status=422)]})
    sink = Sink("crm", store, lambda: sender, retry=RETRY)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await ingest(store, "good", "bad")
        with trio.fail_after(5):
            while sink.delivered + sink.dead < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

    found = await store.call(
        lambda conn: conn.execute(
            "SELECT CAST(e.payload AS TEXT), d.state, d.last_status, d.last_latency, d.last_response "
            "FROM deliveries d JOIN events e ON e.seq = d.event_seq ORDER BY d.rowid"
        ).fetchall()
    )
    [good, bad] = found
    assert good[:3] == ('"good"', DELIVERED, 201)
    assert 0.02 <= good[3] < 2
    assert good[4] == '{"created": "good"}'
    assert bad[:3] == ('"bad"', DEAD, 422)
    assert bad[3] is not None
    assert bad[4] is None  # a refusal's answer is in last_error


def dues(*names: str) -> list[Due]:
    return [
        Due(n, f"ev{n}.crm", 0, 0.0, json.dumps(name).encode(), None, f"ev{n}")
        for n, name in enumerate(names)
    ]


@pytest.fixture
def outcome_level() -> Iterator[None]:
    before = outcome_log.level
    yield
    outcome_log.setLevel(before)


def fields_of(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int, dict[str, Any]]]:
    return [(r.getMessage(), r.levelno, r.fields) for r in caplog.records]  # type: ignore[attr-defined]


def test_one_delivery_one_line_per_final_outcome(
    caplog: pytest.LogCaptureFixture, outcome_level: None
) -> None:
    caplog.set_level(logging.INFO, logger="ferry.sink")
    log_final_outcomes("crm", dues("a"), Outcomes([(0, 200)], [], []), 0.0123, '{"ok":true}')
    log_final_outcomes("crm", dues("b"), Outcomes([], [(0, 99.0, 503, "HTTP 503")], []), 0.2, None)
    log_final_outcomes("crm", dues("c"), Outcomes([], [], [(0, 422, "HTTP 422: no")]), 0.01, None)
    [(msg, level, fields), (dead_msg, dead_level, dead)] = fields_of(caplog)  # the retry is not final
    assert (msg, level) == ("delivered", logging.INFO)
    assert {k: v for k, v in fields.items() if k != "age_ms"} == {
        "sink": "crm",
        "delivery_id": "ev0.crm",
        "event_id": "ev0",
        "status": 200,
        "attempts": 1,
        "latency_ms": 12.3,
        "response": '{"ok":true}',
    }
    assert (dead_msg, dead_level) == ("delivery dead-lettered", logging.ERROR)
    assert (dead["delivery_id"], dead["status"], dead["error"]) == ("ev0.crm", 422, "HTTP 422: no")


def test_a_batch_logs_one_line_per_outcome_naming_every_delivery(
    caplog: pytest.LogCaptureFixture, outcome_level: None
) -> None:
    caplog.set_level(logging.INFO, logger="ferry.sink")
    names = [f"n{i}" for i in range(IDS_PER_LINE + 5)]
    batch = dues(*names, "retry", "dead")
    delivered: list[tuple[int, int | None]] = [(n, 200) for n in range(len(names))]
    outcomes = Outcomes(delivered, [(len(names), 99.0, 503, "x")], [(len(names) + 1, 422, "HTTP 422: no")])
    log_final_outcomes("crm", batch, outcomes, 0.05, '{"ok":true}')
    lines = fields_of(caplog)
    assert [(msg, f["deliveries"]) for msg, _, f in lines] == [
        ("delivered", IDS_PER_LINE),
        ("delivered", 5),
        ("delivery dead-lettered", 1),
    ]
    logged = [i for _, _, f in lines[:2] for i in f["delivery_ids"]]
    assert logged == [f"ev{n}.crm" for n in range(len(names))]
    assert lines[2][2]["delivery_ids"] == [f"ev{len(names) + 1}.crm"]
    assert lines[0][2]["response"] == '{"ok":true}'

    caplog.clear()
    outcome_log.setLevel(logging.ERROR)  # [telemetry] log_outcomes = "dead"
    log_final_outcomes("crm", batch, outcomes, 0.05, None)
    assert [r.getMessage() for r in caplog.records] == ["delivery dead-lettered"]


def test_attempts_committed_together_share_lines_by_outcome_status_and_answer(
    caplog: pytest.LogCaptureFixture, outcome_level: None
) -> None:
    caplog.set_level(logging.INFO, logger="ferry.sink")
    [a, b, c, d] = dues("a", "b", "c", "d")
    log_committed(
        "crm",
        [
            ([a], Outcomes([(a.rowid, 200)], [], []), 0.010, '{"ok":true}'),
            ([b], Outcomes([(b.rowid, 200)], [], []), 0.030, '{"ok":true}'),
            ([c], Outcomes([(c.rowid, 200)], [], []), 0.020, '{"id":3}'),
            ([d], Outcomes([], [], [(d.rowid, 422, "HTTP 422: no")]), 0.005, None),
        ],
    )
    [(msg, _, shared), (_, _, alone), (dead_msg, _, dead)] = fields_of(caplog)
    assert msg == "delivered"
    assert (shared["deliveries"], shared["delivery_ids"], shared["event_ids"]) == (
        2,
        [a.id, b.id],
        [a.event_id, b.event_id],
    )
    assert (shared["latency_ms"], shared["response"], shared["attempts_max"]) == (30.0, '{"ok":true}', 1)
    # A delivery alone in its group keeps the single-delivery line, with its own attempt's figures.
    assert (alone["delivery_id"], alone["latency_ms"], alone["response"]) == (c.id, 20.0, '{"id":3}')
    assert (dead_msg, dead["delivery_id"], dead["error"]) == ("delivery dead-lettered", d.id, "HTTP 422: no")
