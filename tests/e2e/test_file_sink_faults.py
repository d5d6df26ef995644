"""The file sink on a disk that fills up, and after a crash mid-line, under the real daemon.

The sink's file lives on a 256 KiB tmpfs of its own (mounting needs root, as CI runs), so the
kernel really returns a short write and then `ENOSPC`; the store is on the ordinary disk. Every
line of the file must be a whole JSON line, and every delivery the store counts delivered must
be in the file exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes import Daemon, until, write_config

PIPELINE = """
[telemetry]
metrics = false

[sources.demo]
type = "webhook"

[sinks.out]
type = "file"
inputs = ["demo"]
path = "out/events.jsonl"
retry = { max_attempts = 10000, initial_backoff = "20ms", max_backoff = "100ms", max_age = "1h" }
"""


def _mount(path: Path, size: str) -> bool:
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, check=False
    )
    return done.returncode == 0


@pytest.fixture
def small_out(tmp_path: Path) -> Iterator[Path]:
    """`tmp_path/out` as a 256 KiB tmpfs, unmounted afterwards."""
    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() != 0 or not _mount(out, "256k"):
        pytest.skip(
            "needs root (CAP_SYS_ADMIN) to mount a small tmpfs; test_file_sink_rlimit covers it without"
        )
    try:
        yield out
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


def lines_of(path: Path, *, appending: bool = False) -> list[bytes]:
    """The file's lines; asserts that each is one whole `{"id", "event"}` JSON object.

    `appending`: the daemon may be in the middle of an append (while the disk is full it writes
    part of a line, meets ENOSPC and cuts it back, over and over): bytes after the last newline
    are that append, not a line yet, and are left out (seen in 1 of 500 reads). Without it, the
    file must end with a whole line."""
    data = path.read_bytes() if path.exists() else b""
    if appending:
        data = data[: data.rfind(b"\n") + 1]
    assert data == b"" or data.endswith(b"\n"), f"torn tail: {data[-80:]!r}"
    lines = data.split(b"\n")[:-1]
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not whole JSON: {line[:60]!r}…{line[-60:]!r}") from None
        assert set(record) == {"id", "event"}, record
    return lines


def delivered(tmp_path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(f"file:{tmp_path / 'state/ferry.db'}?mode=ro", uri=True)) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM deliveries WHERE stage = 'out' AND state = 1")}


def file_ids(path: Path, *, appending: bool = False) -> Counter[str]:
    return Counter(json.loads(line)["id"] for line in lines_of(path, appending=appending))


def test_a_full_disk_never_counts_a_torn_line_as_delivered(tmp_path: Path, small_out: Path) -> None:
    config = write_config(tmp_path, PIPELINE)
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    target = small_out / "events.jsonl"
    try:
        acked: list[str] = []
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            for n in range(100):  # 100 lines of ~3 KB: more than 256 KiB holds
                response = client.post("/hooks/demo", json={"n": n, "pad": "x" * 3000})
                assert response.status_code == 202, response.text
                acked.append(response.json()["id"])
        wanted = {f"{event_id}.out" for event_id in acked}

        # The disk fills: the rest keep failing with ENOSPC and are retried, never counted.
        daemon.wait_log(lambda line: "No space left" in line.get("error", ""), timeout=30)
        done = delivered(tmp_path)
        ids = file_ids(target, appending=True)  # the retries go on meanwhile
        assert 0 < len(done) < 100, len(done)
        assert all(count == 1 for count in ids.values()), f"a line written twice: {ids.most_common(3)}"
        assert done <= set(ids), f"counted delivered but not in the file: {sorted(done - set(ids))[:3]}"
        assert set(ids) <= wanted

        # Space returns: everything is delivered, each exactly once, whole.
        subprocess.run(["mount", "-o", "remount,size=2m", str(small_out)], check=True)
        until(lambda: delivered(tmp_path), lambda done: done == wanted, timeout=60)
        ids = file_ids(target)
        assert set(ids) == wanted
        assert all(count == 1 for count in ids.values()), f"a line written twice: {ids.most_common(3)}"
    finally:
        daemon.stop()


def test_a_torn_tail_left_by_a_crash_is_cut_back_before_the_next_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = out / "events.jsonl"
    whole = b'{"id":"earlier.out","event":{"n":0}}\n'
    target.write_bytes(whole + b'{"id":"torn.out","event":{"n":1,"pad":"xxxx')  # the crash cut it here
    daemon = Daemon(write_config(tmp_path, PIPELINE), tmp_path / "ferry.log").start()
    try:
        with httpx.Client(base_url=daemon.url, timeout=10) as client:
            response = client.post(
                "/hooks/demo",
                content=b'{\n  "n": 2,\n  "text": "a\\nb"\n}\n',
                headers={"content-type": "application/json"},
            )
            assert response.status_code == 202, response.text
            event_id = response.json()["id"]
        until(lambda: delivered(tmp_path), lambda done: done == {f"{event_id}.out"})
    finally:
        daemon.stop()
    lines = lines_of(target)
    assert lines[0] == whole.rstrip(b"\n")
    assert len(lines) == 2, lines
    assert json.loads(lines[1]) == {"id": f"{event_id}.out", "event": {"n": 2, "text": "a\nb"}}
