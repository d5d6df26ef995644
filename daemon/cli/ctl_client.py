"""`ferry ctl`'s connection to the control socket: one request, its progress lines, its answer.

Its own module so that every `ctl_*` command module can use it without importing `ctl.py`
(which imports them).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from daemon.control.protocol import VERSION, Answer

_decode_answer = msgspec.json.Decoder(Answer).decode


class NotRunning(Exception):
    """Nothing answers on the control socket."""


class CommandFailed(Exception):
    """The daemon answered `ok: false`."""


class Client:
    """One connection to the control socket; `request()` sends a command and returns its result."""

    def __init__(self, path: Path, *, timeout: float = 60.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise NotRunning(f"ferry is not running (nothing listens on {path}: {exc.strerror})") from None
        except PermissionError:
            self._sock.close()
            raise CommandFailed(f"permission denied connecting to {path}") from None
        self._file = self._sock.makefile("rb")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(
        self,
        cmd: str,
        *,
        on_progress: Callable[[Any], None] | None = None,
        wait: float | None = None,
        **args: Any,
    ) -> Any:
        """Send `{"v": 1, "cmd": cmd, **args}`; return the answer's `result` or raise `CommandFailed`.

        `wait` overrides the client's timeout for this answer (a drain takes its own time).
        """
        if wait is not None:
            self._sock.settimeout(wait)
        message = {"v": VERSION, "cmd": cmd, **{k: v for k, v in args.items() if v is not None}}
        try:
            self._sock.sendall(msgspec.json.encode(message) + b"\n")
            while True:
                line = self._file.readline()
                if not line:
                    raise CommandFailed("the daemon closed the connection without answering")
                answer = _decode_answer(line)
                if not answer.ok:
                    raise CommandFailed(answer.error or "unknown error")
                if answer.progress is not None and answer.result is None:
                    if on_progress is not None:
                        on_progress(answer.progress)
                    continue
                return answer.result
        except TimeoutError:
            raise CommandFailed(f"no answer from the daemon within {self._sock.gettimeout():g}s") from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise CommandFailed(f"connection to the daemon lost: {exc.strerror}") from None
