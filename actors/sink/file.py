"""The file sink's sender: appends each delivery as one JSON line, fsynced before it counts.

Delivery: a line is delivered once `fsync` has returned; a crash between the
write and the fsync may leave a line that is written again on retry, so
readers should de-duplicate on `id` (each line is `{"id": ..., "event": ...}`).
Disk errors are retryable: the delivery waits in the store for space to return.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import final

import trio

from daemon.config.root import FileSinkConfig
from daemon.errors import RetryableDelivery
from daemon.store.outbox import Due


def _append(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@final
class FileSender:
    """Appends deliveries to `config.path`; see the module docstring."""

    def __init__(self, name: str, config: FileSinkConfig) -> None:
        self.name = name
        self._path = config.path

    def __repr__(self) -> str:
        return f"<FileSender {self.name} {self._path}>"

    async def send(self, batch: Sequence[Due]) -> int | None:
        data = b"".join(b'{"id":"' + due.id.encode() + b'","event":' + due.payload + b"}\n" for due in batch)
        try:
            await trio.to_thread.run_sync(_append, self._path, data)
        except OSError as exc:
            raise RetryableDelivery(f"cannot append to {self._path}: {exc.strerror or exc}") from None
        return None

    async def aclose(self) -> None:
        return None
