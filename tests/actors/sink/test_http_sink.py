"""The HTTP sender against a real local server: array bodies and `batch.envelope`."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest

from actors.sink.config import HttpSinkConfig
from actors.sink.http import HttpSender
from actors.sink.judge import Answer
from daemon.store.outbox import Due
from tests.fakes import FakeReceiver


@pytest.fixture
def receiver() -> Iterator[FakeReceiver]:
    fake = FakeReceiver().start()
    yield fake
    fake.stop()


def dues(count: int) -> list[Due]:
    return [Due(n, f"e{n}.crm", 0, 0.0, b'{"n":%d}' % n, None, f"e{n}") for n in range(count)]


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        ({"max_items": 10}, [{"n": 0}, {"n": 1}, {"n": 2}]),
        ({"max_items": 10, "envelope": "inputs"}, {"inputs": [{"n": 0}, {"n": 1}, {"n": 2}]}),
    ],
)
async def test_a_batch_is_an_array_or_an_enveloped_array(
    receiver: FakeReceiver, batch: dict[str, object], expected: object
) -> None:
    config = msgspec.convert(
        {"type": "http", "inputs": ["x"], "url": receiver.url + "/batch", "batch": batch}, HttpSinkConfig
    )
    sender = HttpSender("crm", config)
    try:
        assert await sender.send(dues(3)) == Answer(200, '{"ok":true}')
    finally:
        await sender.aclose()
    (request,) = receiver.snapshot()
    assert request.json() == expected
    assert request.headers["ferry-batch-size"] == "3"


def test_an_empty_envelope_name_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="envelope"):
        msgspec.convert(
            {"type": "http", "inputs": ["x"], "url": "http://x", "batch": {"envelope": ""}}, HttpSinkConfig
        )
