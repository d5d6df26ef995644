"""A secret rotated by a reload: the new value is used and hidden; the old one stays hidden."""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from daemon.reload import reload
from daemon.telemetry import masking
from daemon.telemetry.logs import setup_logging
from tests.daemon.test_reload import Daemon

OLD, NEW = "rotation-old-secret-4f1d2c", "rotation-new-secret-9a8b7c"
BODY = """
[sources.gh]
type = "webhook"
verify = { scheme = "github", secrets = ["file:gh.secret"] }

[sinks.out]
type = "file"
inputs = ["gh"]
path = "out.jsonl"
"""


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short folder: socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ferry-rot-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ferry_log() -> Iterator[io.StringIO]:
    """The `ferry.*` JSON log lines, as `ferry run` sets them up; the logging setup restored after."""
    logger = logging.getLogger("ferry")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    stream = io.StringIO()
    setup_logging("info", masking.Redactor.build([], [OLD]))
    handler = logger.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    yield stream
    logger.handlers[:], logger.level, logger.propagate = saved


def signed(secret: str, body: bytes) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={digest}"}


async def test_a_rotated_secret_is_used_and_hidden_and_the_old_one_stays_hidden(
    tmp_path: Path, sock_dir: Path, ferry_log: io.StringIO
) -> None:
    daemon = Daemon(tmp_path, sock_dir / "ferry.sock")
    (tmp_path / "gh.secret").write_text(OLD)
    async with trio.open_nursery() as nursery:
        running = await daemon.start(nursery, BODY)
        assert OLD in running.redaction.redactor.secrets  # serve built it from the config
        body = b'{"n": 1}'
        answer = await daemon.client.post("/hooks/gh", content=body, headers=signed(OLD, body))
        assert answer.status_code == 202
        (tmp_path / "gh.secret").write_text(NEW)
        result = await reload(running)
        assert result.applied
        assert result.changed == ["sources.gh"]
        assert {OLD, NEW} <= set(running.redaction.redactor.secrets)
        logging.getLogger("ferry.test").warning("echoed %s and %s", OLD, NEW)
        body = b'{"n": 2}'
        assert (
            await daemon.client.post("/hooks/gh", content=body, headers=signed(OLD, body))
        ).status_code == 401
        assert (
            await daemon.client.post("/hooks/gh", content=body, headers=signed(NEW, body))
        ).status_code == 202
        running.stop.set()
    await daemon.client.aclose()
    text = ferry_log.getvalue()
    assert '"msg":"echoed *** and ***"' in text
    assert OLD not in text
    assert NEW not in text
