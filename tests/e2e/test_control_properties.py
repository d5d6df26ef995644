"""Property test of the control socket of the real daemon: any request line gets one JSON answer.

hypothesis sends request lines over the real Unix socket of a running `ferry run`: JSON objects
with any of the known commands (or made-up ones), any fields with any values, other JSON values,
and raw bytes. Every line gets exactly one answer line (after any `progress` lines) with
`v = 1` and a boolean `ok`; a refusal carries a non-empty `error`; the connection and the daemon
live on, and the daemon logs no error. `tap` and `drain` are left out: a valid `tap` streams for
up to a week and a valid `drain` stops the daemon, both by design.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.depth import examples
from tests.fakes import Daemon, write_config

PIPELINE = """
[telemetry]
metrics = false

[control]
socket = "{socket}"

[sources.demo]
type = "webhook"

[sinks.out]
type = "file"
inputs = ["demo"]
path = "out.jsonl"
"""

COMMANDS = [
    "status",
    "pause",
    "resume",
    "dlq.list",
    "dlq.show",
    "dlq.retry",
    "dlq.purge",
    "stats",
    "audit",
    "reload",
    "replay",
    "launch",
    "",
    "STATUS",
]
FIELDS = [
    "v",
    "name",
    "sink",
    "since",
    "error",
    "limit",
    "id",
    "ids",
    "all",
    "dry_run",
    "source",
    "until",
    "to",
    "timeout",
    "extra",
]
value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["demo", "out", "nope", 1, -1, 0, "1h"]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
request = st.fixed_dictionaries(
    {"cmd": st.sampled_from(COMMANDS)}, optional={"v": st.sampled_from([1, 1, 1, 2, "1", None])}
).flatmap(
    lambda base: st.dictionaries(st.sampled_from(FIELDS), value, max_size=4).map(
        lambda extra: {**extra, **base}
    )
)
line = st.one_of(
    request.map(lambda message: json.dumps(message).encode()),
    value.map(lambda other: json.dumps(other).encode()),
    st.binary(max_size=60).map(lambda raw: raw.replace(b"\n", b" ")),
).filter(lambda raw: raw.strip())  # a blank line is no request: skipped without an answer, by design


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("control")
    sock_dir = Path(tempfile.mkdtemp(prefix="ferry-prop-", dir="/tmp"))
    path = sock_dir / "ferry.sock"
    daemon = Daemon(write_config(folder, PIPELINE.format(socket=path)), folder / "ferry.log").start()
    yield path
    daemon.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)
    errors = [entry for entry in daemon.logs() if entry.get("level") in ("error", "critical")]
    assert errors == [], errors


def answer(conn: socket.socket, buffer: bytearray) -> dict[str, Any]:
    """The next non-progress answer line."""
    while True:
        while b"\n" not in buffer:
            chunk = conn.recv(65536)
            assert chunk, "the daemon closed the connection without answering"
            buffer.extend(chunk)
        raw, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        decoded: dict[str, Any] = json.loads(raw)
        if "progress" not in decoded:
            return decoded


@given(lines=st.lists(line, min_size=1, max_size=5))
@settings(max_examples=examples(80), deadline=None, suppress_health_check=list(HealthCheck))
def test_any_request_line_gets_one_json_answer_and_the_daemon_lives_on(
    control: Path, lines: list[bytes]
) -> None:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(str(control))
        buffer = bytearray()
        for raw in lines:
            conn.sendall(raw + b"\n")
            try:
                reply = answer(conn, buffer)
            except TimeoutError:
                raise AssertionError(f"no answer to {raw!r}") from None
            assert reply["v"] == 1
            assert isinstance(reply["ok"], bool)
            if not reply["ok"]:
                assert isinstance(reply["error"], str)
                assert reply["error"]
        conn.sendall(b'{"v": 1, "cmd": "resume", "name": "out"}\n{"v": 1, "cmd": "resume", "name": "demo"}\n')
        answer(conn, buffer)
        answer(conn, buffer)
        conn.sendall(b'{"v": 1, "cmd": "status"}\n')
        assert answer(conn, buffer)["ok"] is True
