"""The control socket: JSON lines over a local Unix socket, spoken by `ferry ctl`.

Protocol (version 1):
    One request per line, a JSON object `{"v": 1, "cmd": "status", ...}` decoded into
    one of the typed `Request` structs (`daemon.control.protocol`); one final answer per request,
    `{"v": 1, "ok": true, "result": ...}` or `{"v": 1, "ok": false, "error": "..."}`.
    A long command (`drain`, `replay`, `tap`) may send `{"v": 1, "ok": true, "progress": ...}` lines
    before its answer. Requests on one connection are answered in order.

Access:
    The socket file is created mode 0660 (bound under a temporary name, then renamed
    into place, so it is never reachable with looser permissions), given `[control]
    group` when one is set, and removed on exit. A stale socket left by a dead daemon
    is replaced; a live one is not (startup fails with `ControlUnavailable`). Each
    connection's peer credentials (`SO_PEERCRED`, `SO_PEERGROUPS`) must show the
    daemon's own uid, root, or membership of `[control] group`; anyone else gets an
    error answer, an audit row, and the connection closed. The audit row (the peer's uid
    and pid, the command named by its first line when that is a known one, else `connect`)
    is written whatever the peer sent or did: nothing, garbage, JSON nested too deeply, a
    line too long, a hang-up.

Bad input:
    Malformed JSON (JSON nested too deeply included), a request that is not an object, an
    unknown command, a wrong version or bad arguments get an error answer and the
    connection stays usable. A line longer than `max_line` gets an error
    answer and the connection is closed (what follows cannot be framed). A command
    runs for at most `request_timeout` (drain: its own timeout plus that); an exception
    inside a command is answered as an internal error and logged, never raised.

Resource handling:
    At most `max_clients` connections at once (more are answered with an error and
    closed); a connection idle for `idle_timeout` is closed.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, final

import msgspec
import trio

from daemon.config.root import LoadedConfig
from daemon.config.sections import ControlConfig
from daemon.control.input import asked_command, shown
from daemon.control.protocol import (
    COMMANDS,
    MAX_LINE,
    VERSION,
    CommandError,
    Failed,
    Ok,
    Progress,
    encode_line,
)
from daemon.errors import ControlUnavailable

log = logging.getLogger("ferry.control")

DEFAULT_SOCKET: Final = ControlConfig().socket
SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; not in the socket module


# -- peers and access ------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def peer_of(sock: socket.socket | trio.socket.SocketType) -> Peer:
    """The connected peer's credentials (`SO_PEERCRED`) and supplementary groups (`SO_PEERGROUPS`)."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    groups: tuple[int, ...] = ()
    for size in (4 * 256, 4 * 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            break  # an older kernel: the primary gid still counts
        groups = struct.unpack(f"{len(raw) // 4}I", raw)
        break
    return Peer(pid, uid, gid, groups)


@dataclass(frozen=True)
class Access:
    """Who may use the socket: `uid` (the daemon's own), root, and members of `gid`."""

    uid: int
    gid: int | None = None

    def allows(self, peer: Peer) -> bool:
        if peer.uid in (0, self.uid):
            return True
        return self.gid is not None and (peer.gid == self.gid or self.gid in peer.groups)


def group_id(group: str) -> int:
    """A group name or number as a gid; raises `ControlUnavailable` for an unknown group."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlUnavailable(f"$.control.group: no such group {group!r}") from None


def socket_path(loaded: LoadedConfig, environ: Mapping[str, str] = os.environ) -> Path:
    """Where the control socket lives: `[control] socket`, or under `$RUNTIME_DIRECTORY`.

    A config that leaves `socket` at its default gets `$RUNTIME_DIRECTORY/ferry.sock` when
    systemd provides a runtime directory (the first one, if it lists several).
    """
    configured = Path(loaded.config.control.socket)
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    base = loaded.path.parent if loaded.path is not None else Path.cwd()
    if runtime and configured in (Path(DEFAULT_SOCKET), base / DEFAULT_SOCKET):
        return Path(runtime) / "ferry.sock"
    return configured if configured.is_absolute() else base / configured


# -- the server ------------------------------------------------------------------------------


class Call(Protocol):
    """What a command handler gets besides its request."""

    peer: Peer

    async def progress(self, value: Any) -> None: ...

    def after_answer(self, fn: Callable[[], None]) -> None:
        """Run `fn` once the answer is sent (or could not be: the client went away)."""


Handler = Callable[[Any, Call], Awaitable[Any]]
Refusal = Callable[[Peer, str, str], Awaitable[None]]


class _Oversized(Exception):
    pass


@dataclass
class _Call:
    peer: Peer
    stream: trio.SocketStream
    hooks: list[Callable[[], None]] = field(default_factory=list)

    async def progress(self, value: Any) -> None:
        await self.stream.send_all(encode_line(Progress(value)))

    def after_answer(self, fn: Callable[[], None]) -> None:
        self.hooks.append(fn)


@final
class ControlServer:
    """Serves the control socket at `path`; `handler(request, call)` answers each request.

    `refused(peer, command, outcome)` records a refused connection (the audit trail).
    See the module docstring for the protocol, access rules and limits.
    """

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        access: Access,
        refused: Refusal,
        group: int | None = None,
        request_timeout: float = 30.0,
        idle_timeout: float = 300.0,
        max_line: int = MAX_LINE,
        max_clients: int = 64,
    ) -> None:
        self.path = path
        self._handler = handler
        self._access = access
        self._refused = refused
        self._group = group
        self._request_timeout = request_timeout
        self._idle_timeout = idle_timeout
        self._max_line = max_line
        self._max_clients = max_clients
        self.clients = 0

    def __repr__(self) -> str:
        return f"<ControlServer {self.path} [{self.clients} client(s)]>"

    async def run(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the socket, report its path through `task_status.started()`, serve until cancelled."""
        sock, inode = await self._bind()
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.path)
                while True:
                    client, _ = await sock.accept()
                    nursery.start_soon(self._serve, client)
        finally:
            sock.close()
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == inode:
                    os.unlink(self.path)

    async def _bind(self) -> tuple[trio.socket.SocketType, int]:
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ControlUnavailable(f"{path.parent}: cannot create the socket's folder: {exc}") from None
        await _check_stale(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            await sock.bind(str(temporary))
            os.chmod(temporary, 0o660)
            # Under systemd the file usually has the group already (the service's own): chown(2)
            # is then skipped, as the unit's seccomp filter refuses it (`~@privileged`).
            if self._group is not None and os.stat(temporary).st_gid != self._group:
                try:
                    os.chown(temporary, -1, self._group)
                except OSError as exc:
                    log.warning(
                        "cannot give the control socket its group", extra={"fields": {"error": str(exc)}}
                    )
            sock.listen(128)
            os.replace(temporary, path)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise ControlUnavailable(f"{path}: cannot create the control socket: {exc}") from None
        log.info("control socket listening", extra={"fields": {"socket": str(path)}})
        return sock, os.stat(path).st_ino

    async def _serve(self, sock: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(sock)
        self.clients += 1
        try:
            if self.clients > self._max_clients:
                await stream.send_all(encode_line(Failed("too many control connections; try again")))
                return
            peer = peer_of(sock)
            if not self._access.allows(peer):
                await self._refuse(stream, peer)
                return
            await self._converse(stream, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            log.exception("control connection failed")
        finally:
            self.clients -= 1
            await trio.aclose_forcefully(stream)

    async def _refuse(self, stream: trio.SocketStream, peer: Peer) -> None:
        """Read (briefly) what the peer wanted, record the refusal, answer it."""
        command = "connect"
        # Whatever the peer sends (nothing, garbage, a line too long, JSON nested too deep) or does
        # (hang up, reset), the refusal is recorded: only the command's name is taken from it.
        with trio.move_on_after(min(2.0, self._idle_timeout)), contextlib.suppress(Exception):
            line = await self._read_line(stream, bytearray())
            command = asked_command(line or b"", COMMANDS) or command
        outcome = f"refused: uid {peer.uid} is not allowed"
        log.warning("control connection refused", extra={"fields": {"uid": peer.uid, "pid": peer.pid}})
        with trio.move_on_after(self._request_timeout):
            try:
                await self._refused(peer, command, outcome)
            except Exception as exc:
                log.error(
                    "cannot record a refused control connection",
                    extra={"fields": {"uid": peer.uid, "pid": peer.pid, "error": str(exc)}},
                )
        await stream.send_all(
            encode_line(Failed(f"permission denied: uid {peer.uid} may not use this socket"))
        )

    async def _converse(self, stream: trio.SocketStream, peer: Peer) -> None:
        buffer = bytearray()
        while True:
            line: bytes | None = None
            try:
                with trio.move_on_after(self._idle_timeout):
                    line = await self._read_line(stream, buffer)
            except _Oversized:
                await stream.send_all(encode_line(Failed(f"request longer than {self._max_line} bytes")))
                return
            if line is None:  # EOF, or idle for too long
                return
            if not line.strip():
                continue
            call = _Call(peer, stream)
            try:
                await stream.send_all(await self._answer_line(line, call))
            finally:  # even if the client has gone: a drain must still end in a stop
                for hook in call.hooks:
                    hook()

    async def _read_line(self, stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
        """The next line without its newline; None at EOF. Raises `_Oversized` past `max_line`."""
        while True:
            end = buffer.find(b"\n")
            if end >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                if len(line) > self._max_line:
                    raise _Oversized
                return line
            if len(buffer) > self._max_line:
                raise _Oversized
            data = await stream.receive_some(65536)
            if not data:
                return None
            buffer += data

    async def _answer_line(self, line: bytes, call: _Call) -> bytes:
        """The encoded answer to one request line: every request gets one, whatever it holds."""
        try:
            return encode_line(await self._answer(line, call))
        except Exception as exc:  # a bug of ours: answered and logged, the connection stays usable
            log.exception("control request failed")
            return encode_line(Failed(f"internal error: {type(exc).__name__}"))

    async def _answer(self, line: bytes, call: _Call) -> Ok | Failed:
        try:
            raw = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            return Failed(f"malformed JSON: {exc}")
        except RecursionError:
            return Failed("malformed JSON: nested too deeply")
        if not isinstance(raw, dict):
            return Failed("a request must be a JSON object")
        if raw.get("v") != VERSION:
            return Failed(f"unsupported protocol version {shown(raw.get('v'))}; this daemon speaks {VERSION}")
        command = raw.get("cmd")
        if not isinstance(command, str) or command not in COMMANDS:
            known = ", ".join(sorted(COMMANDS))
            return Failed(f"unknown command {shown(command)}; known: {known}")
        try:
            request = msgspec.convert(raw, COMMANDS[command])
        except msgspec.ValidationError as exc:
            return Failed(f"invalid {command} request: {exc}")
        timeout = self._request_timeout + getattr(request, "timeout", 0.0)
        with trio.move_on_after(timeout):
            try:
                return Ok(await self._handler(request, call))
            except CommandError as exc:
                return Failed(str(exc))
            except Exception as exc:
                log.exception("control command failed", extra={"fields": {"command": command}})
                return Failed(f"internal error: {type(exc).__name__}: {exc}")
        return Failed(f"{command} timed out after {timeout:g}s")


async def _check_stale(path: Path) -> None:
    """Refuse a path that is not a socket or that a live process still listens on."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlUnavailable(f"{path}: exists and is not a socket; not replacing it")
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await probe.connect(str(path))
    except OSError:
        return  # nobody listens: stale, to be replaced
    finally:
        probe.close()
    raise ControlUnavailable(f"{path}: another process is serving this control socket")
