"""Retry warnings: one line at once, then one per interval with counts, the detail at debug (MockClock)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing

from actors.sink.commit import Finished
from actors.sink.retry_log import MAX_KINDS, SUMMARY_INTERVAL, RetryLog
from daemon.errors import DeliveryTimeout, RetryableDelivery
from daemon.store.outbox import Due, Outcomes


def failed(n: int, error: RetryableDelivery, size: int = 1) -> Finished:
    batch = [Due(n * 100 + i, f"e{n}-{i}.crm", 2, 0.0, b"{}", None, f"e{n}-{i}") for i in range(size)]
    outcomes = Outcomes([], [(due.rowid, 1.0, error.status, str(error)) for due in batch], [])
    return Finished(batch, outcomes, error, 0.01, None)


def warnings(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        record.fields  # type: ignore[attr-defined]
        for record in caplog.records
        if record.name == "ferry.sink" and record.levelno == logging.WARNING
    ]


async def test_a_storm_of_retries_logs_one_line_at_once_then_one_per_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "ferry.sink")
    retry_log = RetryLog("crm")
    busy = RetryableDelivery("HTTP 503: busy", status=503)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(retry_log.run)
        retry_log.note([failed(0, busy)])
        [first] = warnings(caplog)
        assert first == {
            "sink": "crm",
            "deliveries": 1,
            "attempts": 1,
            "by_error": {"503": 1},
            "first_delivery_id": "e0-0.crm",
            "attempt": 3,
            "status": 503,
            "error": "HTTP 503: busy",
            "interval_s": 0.0,
        }
        # 25 s of failures, 100 attempts a second, some of them batches of 3 or timeouts.
        for n in range(1, 2501):
            await trio.sleep(0.01)
            if n % 10 == 0:
                retry_log.note([failed(n, DeliveryTimeout("no answer within 5s"), size=3)])
            elif n % 7 == 0:
                retry_log.note([failed(n, RetryableDelivery("HTTP 429", status=429))])
            else:
                retry_log.note([failed(n, busy)])
        lines = warnings(caplog)
        assert len(lines) == 3  # at once, at 10 s, at 20 s
        second = lines[1]
        assert second["interval_s"] == pytest.approx(SUMMARY_INTERVAL, abs=0.05)
        assert second["first_delivery_id"] == "e1-0.crm"
        assert set(second["by_error"]) == {"503", "429", "no answer within 5s"}
        assert second["deliveries"] == sum(second["by_error"].values())
        assert second["attempts"] < second["deliveries"]  # a timeout's attempt carried 3
        retry_log.close()
    retry_log.flush()  # the sink stopping: the last 5 s are logged, nothing is left uncounted
    lines = warnings(caplog)
    assert len(lines) == 4
    assert sum(line["attempts"] for line in lines) == 2501
    assert sum(line["deliveries"] for line in lines) == 2501 + 250 * 2
    retry_log.flush()
    assert len(warnings(caplog)) == 4  # nothing new: no line


async def test_a_quiet_sink_logs_its_next_failure_at_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "ferry.sink")
    retry_log = RetryLog("crm")
    error = RetryableDelivery("connection refused")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(retry_log.run)
        retry_log.note([failed(0, error)])
        await trio.sleep(SUMMARY_INTERVAL + 1)
        retry_log.note([failed(1, error)])
        assert [line["first_delivery_id"] for line in warnings(caplog)] == ["e0-0.crm", "e1-0.crm"]
        assert warnings(caplog)[1]["by_error"] == {"connection refused": 1}
        retry_log.close()


async def test_each_failed_attempt_is_logged_at_debug_and_kinds_are_bounded(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "ferry.sink")
    retry_log = RetryLog("crm")
    retry_log.note([failed(n, RetryableDelivery(f"error {n}")) for n in range(MAX_KINDS + 5)])
    details = [r.fields for r in caplog.records if r.levelno == logging.DEBUG]  # type: ignore[attr-defined]
    assert [d["delivery_ids"] for d in details] == [[f"e{n}-0.crm"] for n in range(MAX_KINDS + 5)]
    assert details[3]["error"] == "error 3"
    [line] = warnings(caplog)
    assert len(line["by_error"]) == MAX_KINDS + 1
    assert line["by_error"]["other"] == 5
