"""The file sink's appends: whole lines or nothing, against the kernel's real short writes."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from actors.sink.file import append_whole, one_line, whole_lines_end
from tests.fakes import ROOT

# A child process with a file-size limit (RLIMIT_FSIZE): a write crossing it is cut short by the
# kernel and the next one fails with EFBIG (Python ignores SIGXFSZ). No root needed.
CHILD = """
import json, sys
from actors.sink.file import append_whole
path, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
results = []
for n in range(count):
    line = json.dumps({"id": f"d{n}", "event": {"pad": "x" * size}}).encode() + b"\\n"
    try:
        append_whole(path, line)
        results.append([n, None])
    except OSError as exc:
        results.append([n, exc.errno])
print(json.dumps(results))
"""


def _limited(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def run_child(path: Path, count: int, size: int, limit: int) -> list[tuple[int, int | None]]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(count), str(size)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        preexec_fn=lambda: _limited(limit),
    )
    return [(n, errno) for n, errno in json.loads(done.stdout)]


def test_a_write_cut_short_by_the_file_size_limit_leaves_only_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    results = run_child(path, count=10, size=3000, limit=10_000)
    ok = [n for n, errno in results if errno is None]
    failed = {errno for _, errno in results if errno is not None}
    assert ok == [0, 1, 2], results  # three 3 KB lines fit under 10,000 bytes
    assert failed == {27}, results  # EFBIG
    data = path.read_bytes()
    assert data.endswith(b"\n")
    assert [json.loads(line)["id"] for line in data.splitlines()] == ["d0", "d1", "d2"]


def test_an_append_after_a_torn_tail_starts_on_a_line_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id":"a"}\n{"id":"b"}\n{"id":"c","ev')
    append_whole(str(path), b'{"id":"d"}\n')
    assert path.read_bytes() == b'{"id":"a"}\n{"id":"b"}\n{"id":"d"}\n'


def test_a_file_of_one_fragment_is_cut_to_nothing(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"x" * 200_000)  # longer than one read of the tail
    append_whole(str(path), b'{"id":"d"}\n')
    assert path.read_bytes() == b'{"id":"d"}\n'


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", 0),
        (b"a\n", 2),
        (b"a\nb", 2),
        (b"abc", 0),
        (b"a\n" + b"y" * 70_000, 2),  # the newline is found across read chunks
        (b"a\n" * 40_000, 80_000),
    ],
)
def test_whole_lines_end(tmp_path: Path, content: bytes, expected: int) -> None:
    path = tmp_path / "f"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert whole_lines_end(fd, len(content)) == expected
    finally:
        os.close(fd)


def test_a_pretty_printed_payload_becomes_one_line_with_the_same_value() -> None:
    payload = b'{\r\n  "a": "x\\ny",\n  "b": [1,\n 2]\n}\n'
    flat = one_line(payload)
    assert b"\n" not in flat
    assert b"\r" not in flat
    assert json.loads(flat) == json.loads(payload)
    assert one_line(b'{"a":1}') == b'{"a":1}'


def test_a_file_that_is_not_json_lines_is_refused_not_truncated(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    content = b"a\n" + b"z" * 300_000
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="does not end with a newline"):
            whole_lines_end(fd, len(content), limit=200_000)
        assert whole_lines_end(fd, len(content), limit=400_000) == 2
    finally:
        os.close(fd)
