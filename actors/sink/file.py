"""The file sink's sender: appends each delivery as one JSON line, fsynced before it counts.

Delivery:
    A request's lines are appended whole or not at all. A short write (a nearly full disk, a
    file-size limit) is continued until every byte is written; if the disk refuses the rest
    (`ENOSPC`, `EFBIG`, `EIO`…) or the `fsync` fails, the file is cut back to where the append
    began and the attempt fails as retryable, so the deliveries wait in the store for space to
    return. A delivery counts as delivered only once its whole line is written and `fsync` has
    returned. Each delivery is one line: a payload received with line breaks (pretty-printed JSON) is
    written with spaces in their place, which changes no value.

Torn tails:
    Before each append, a file that does not end with a newline (a crash mid-write, or a cut
    back that itself failed) is truncated to its last newline, so a new line never starts in
    the middle of an old fragment. The fragment was never counted delivered (its `fsync` had
    not returned), so its delivery is still pending and is written again whole. A tail over
    `MAX_TORN_TAIL` (64 MiB) without a newline is no line ferry left: the append fails
    (retryable) and the file is left as it is.

Duplicates:
    A crash after the write but before the outcome commits leaves a whole line that is written
    again on retry, so readers should de-duplicate on `id` (each line is
    `{"id": ..., "event": ...}`).

Concurrency:
    Appends to one path are serialised in the process (a lock per path), so a worker cutting
    back a torn tail never truncates another worker's append in progress. The file must have
    no other writer.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from typing import Final, final

import trio

from actors.sink.config import FileSinkConfig
from daemon.errors import RetryableDelivery
from daemon.store.outbox import Due

_TAIL_CHUNK: Final = 64 * 1024
MAX_TORN_TAIL: Final = 64 * 1024**2
"""Longest torn tail cut back; a longer line without a newline is refused, never truncated."""
_ONE_LINE: Final = bytes.maketrans(b"\r\n", b"  ")
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(path: str) -> threading.Lock:
    key = os.path.abspath(path)
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def one_line(payload: bytes) -> bytes:
    """`payload` (JSON) on one line: a body received pretty-printed keeps its line breaks, which
    JSON allows only as whitespace between tokens (inside strings they are escaped), so turning
    them into spaces changes no value."""
    if b"\n" in payload or b"\r" in payload:
        return payload.translate(_ONE_LINE)
    return payload


def whole_lines_end(fd: int, size: int, limit: int = MAX_TORN_TAIL) -> int:
    """The length of the file's whole lines: `size` when it ends with a newline (or is empty),
    else the offset just after its last newline (0 when it holds none).

    Raises `OSError` (EINVAL) rather than cut a tail longer than `limit` bytes: that is no line
    ferry left half-written but a file that is not JSON lines, and it is not ours to truncate.
    """
    end = size
    while end > 0:
        if size - end >= limit:
            raise OSError(
                errno.EINVAL,
                f"the file does not end with a newline and its last {limit} bytes hold none: "
                "not cut back (not a JSON lines file? move it away)",
            )
        start = max(0, end - _TAIL_CHUNK)
        chunk = os.pread(fd, end - start, start)
        if end == size and chunk.endswith(b"\n"):
            return size
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def append_whole(path: str, data: bytes) -> None:
    """Append `data` (whole lines) to `path` and fsync it, or leave the file as it was and raise
    `OSError`; a torn tail found first is cut back to the last newline (module docstring)."""
    with _lock_for(path):
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            _append_locked(fd, data)
        finally:
            os.close(fd)


def _append_locked(fd: int, data: bytes) -> None:
    size = os.fstat(fd).st_size
    start = whole_lines_end(fd, size)
    if start != size:
        os.ftruncate(fd, start)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:  # never for a regular file; guards the loop
                raise OSError(f"write returned {written}")
            view = view[written:]
        os.fsync(fd)
    except OSError:
        try:
            os.ftruncate(fd, start)
            os.fsync(fd)
        except OSError:
            pass  # the next append cuts the torn tail back to the last newline
        raise


@final
class FileSender:
    """Appends deliveries to `config.path`; see the module docstring."""

    def __init__(self, name: str, config: FileSinkConfig) -> None:
        self.name = name
        self._path = config.path

    def __repr__(self) -> str:
        return f"<FileSender {self.name} {self._path}>"

    async def send(self, batch: Sequence[Due]) -> int | None:
        data = b"".join(
            b'{"id":"' + due.id.encode() + b'","event":' + one_line(due.payload) + b"}\n" for due in batch
        )
        try:
            await trio.to_thread.run_sync(append_whole, self._path, data)
        except OSError as exc:
            raise RetryableDelivery(f"cannot append to {self._path}: {exc.strerror or exc}") from None
        return None

    async def aclose(self) -> None:
        return None
