"""HTTP/1.1 on the wire for ferry's lean client: a request's bytes, and a response read from bytes.

No I/O here (`daemon.http.client.LeanClient` does the socket side), so every rule below is
tested with bytes alone (tests/daemon/http/test_wire.py).

Why not h11: h11 validates the request's fields and runs a state machine for each event of
the exchange; that was ~40 % of the lean client's CPU per request (docs/performance.md,
session 5). A client that sends one request and reads one response per turn needs much
less: the same grammar checks, done once per line.

Requests (`encode_head`): the method must be a token, the target visible ASCII, each field
name a token and each value ASCII with no NUL, CR, LF or other control whitespace and no
leading or trailing blanks (h11's rules) — else `InvalidRequest`, before a byte is sent.

Responses (`ResponseParser`), as RFC 9112 frames them and as hostile receivers try them:

- the head (status line and fields) is at most `MAX_HEAD` bytes; lines may end in CRLF or
  LF; obsolete line folding is joined with a space; a status line other than `HTTP/1.0` or
  `HTTP/1.1` with three digits, or a field line that is not `token: value`, is `BadResponse`;
- 1xx answers (100 Continue, 103 Early Hints) are skipped; 101 is `BadResponse` (ferry never
  asks to switch protocols);
- no body for HEAD, 204 and 304; otherwise `Transfer-Encoding: chunked` (any other coding is
  `BadResponse`), else `Content-Length` (digits, several values only if equal), else the body
  runs to the connection's end;
- the body is cut to `max_body` bytes; the rest is read and dropped;
- `reusable` is true only when the response ended where its framing says, the connection is
  HTTP/1.1 without `Connection: close`, both `Transfer-Encoding` and `Content-Length` were not
  given together, and no byte came after it: stray bytes are never read as the next answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, final

MAX_HEAD: Final = 16 * 1024  # status line and fields, as h11's default
MAX_CHUNK_LINE: Final = 1024  # a chunk's size line with its extensions; trailers count against MAX_HEAD

_TOKEN: Final = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_VALUE: Final = re.compile(r"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
_TARGET: Final = re.compile(r"[\x21-\x7e]+")

_HEAD_END: Final = re.compile(rb"\r?\n\r?\n")
_EOL: Final = re.compile(rb"\r?\n")
_STATUS: Final = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\x00\n\r\x0b\x0c]*)?")
_FIELD: Final = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*"
)
_CHUNK_SIZE: Final = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\r\n]*)?[ \t]*")
_LENGTH: Final = re.compile(r"[0-9]{1,19}")
_NO_BODY: Final = frozenset({204, 304})

_known_names: set[str] = set()  # field names already checked (the sinks send the same few)


class InvalidRequest(ValueError):
    """A request that is not valid HTTP/1.1: nothing was sent."""


class BadResponse(Exception):
    """The peer's bytes are not a valid HTTP/1.1 response (or break this parser's limits)."""


def check_target(target: str) -> None:
    """Raise `InvalidRequest` unless `target` (path and query) is visible ASCII."""
    if not _TARGET.fullmatch(target):
        raise InvalidRequest(f"illegal request target {target[:80]!r}")


def encode_head(method: str, target: str, fields: Sequence[tuple[str, str]]) -> bytes:
    """The request line and `fields`, CRLF-terminated, as bytes (`target` already checked)."""
    if method not in _known_names and not _TOKEN.fullmatch(method):
        raise InvalidRequest(f"illegal method {method[:40]!r}")
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    for name, value in fields:
        if name not in _known_names:
            if not _TOKEN.fullmatch(name):
                raise InvalidRequest(f"illegal header name {name[:40]!r}")
            if len(_known_names) < 1024:
                _known_names.add(name)
        if not (value.isascii() and _VALUE.fullmatch(value)):
            raise InvalidRequest(f"illegal value of header {name!r}")
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("ascii")


# Parser states: reading a head, then one of the body framings, then done.
_HEAD, _LENGTH_BODY, _CHUNK_LINE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


@final
class ResponseParser:
    """One response, fed the bytes the connection receives; see the module docstring."""

    __slots__ = (
        "_at",
        "_buffer",
        "_chunks",
        "_head_request",
        "_kept",
        "_left",
        "_max_body",
        "_state",
        "headers",
        "reusable",
        "status",
    )

    def __init__(self, *, head_request: bool = False, max_body: int = 64 * 1024) -> None:
        self._head_request = head_request
        self._max_body = max_body
        self._buffer = b""
        self._at = 0  # where the unread part of `_buffer` starts
        self._state = _HEAD
        self._left = 0  # bytes of the body (length framing) or of the chunk still to come
        self._chunks: list[bytes] = []
        self._kept = 0
        self.status = 0
        self.headers: list[tuple[str, str]] = []  # names lower-cased, values latin-1
        self.reusable = False

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def body(self) -> bytes:
        """The body's first `max_body` bytes."""
        body = b"".join(self._chunks)
        return body if len(body) <= self._max_body else body[: self._max_body]

    def feed(self, data: bytes | bytearray) -> bool:
        """Take the next bytes received; true once the response is complete."""
        if type(data) is not bytes:
            data = bytes(data)  # TLS streams may hand a bytearray
        if self._state == _DONE:
            if data:
                self.reusable = False
            return True
        # What is left unread is at most a partial line or head (bodies are always taken whole),
        # so this copy is bounded by MAX_HEAD.
        rest = self._buffer[self._at :] if self._at < len(self._buffer) else b""
        self._buffer, self._at = rest + data if rest else data, 0
        while self._state != _DONE:
            if not self._step():
                return False
        if self._at < len(self._buffer):
            self.reusable = False  # bytes after the response: never taken for the next one
        return True

    def eof(self) -> None:
        """The peer closed the connection: ends a body that runs to the end, else `BadResponse`."""
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            self.reusable = False
        elif self._state == _HEAD:
            raise BadResponse("connection closed in the middle of the response head")
        elif self._state != _DONE:
            raise BadResponse("connection closed before the end of the response body")

    def _step(self) -> bool:
        """Advance by what the buffer holds from `_at`; false when more bytes are needed.

        Positions move forward in one buffer (no slicing of what follows), so a receiver
        sending thousands of tiny chunks costs time linear in its bytes.
        """
        state, buffer, at = self._state, self._buffer, self._at
        if state == _HEAD:
            return self._head()
        if state in (_LENGTH_BODY, _CHUNK_DATA):
            if at >= len(buffer):
                return False
            piece = buffer[at : at + self._left] if at or self._left < len(buffer) else buffer
            self._at = at + len(piece)
            self._keep(piece)
            self._left -= len(piece)
            if self._left == 0:
                self._state = _DONE if state == _LENGTH_BODY else _CHUNK_END
            return True
        if state == _UNTIL_CLOSE:
            self._keep(buffer[at:] if at else buffer)
            self._at = len(buffer)
            return False
        if state == _CHUNK_END:
            if len(buffer) - at < 2:
                return False
            if buffer[at : at + 2] != b"\r\n":
                raise BadResponse("chunk not followed by CRLF")
            self._at = at + 2
            self._state = _CHUNK_LINE
            return True
        if state == _CHUNK_LINE:
            end = buffer.find(b"\r\n", at, at + MAX_CHUNK_LINE + 2)
            if end < 0:
                if len(buffer) - at > MAX_CHUNK_LINE:
                    raise BadResponse("chunk size line too long")
                return False
            match = _CHUNK_SIZE.fullmatch(buffer, at, end)
            if match is None:
                raise BadResponse(f"bad chunk size line {buffer[at : min(end, at + 40)]!r}")
            self._at = end + 2
            self._left = int(match[1], 16)
            self._state = _CHUNK_DATA if self._left else _TRAILERS
            return True
        return self._trailers()

    def _section(self, what: str) -> list[bytes] | None:
        """The lines of a head or trailer section from `_at`, past its empty line; None if incomplete."""
        buffer, at = self._buffer, self._at
        found = _HEAD_END.search(buffer, at, at + MAX_HEAD + 4)
        if found is None or found.start() - at > MAX_HEAD:
            if found is not None or len(buffer) - at > MAX_HEAD:
                raise BadResponse(f"{what} over {MAX_HEAD} bytes")
            return None
        self._at = found.end()
        return _EOL.split(buffer[at : found.start()])

    def _head(self) -> bool:
        lines = self._section("response head")
        if lines is None:
            return False
        status = _STATUS.fullmatch(lines[0])
        if status is None:
            raise BadResponse(f"bad status line {lines[0][:40]!r}")
        code = int(status[2])
        if code < 100:
            raise BadResponse(f"bad status code {code}")
        headers = _fields(lines, 1)
        if code < 200:
            if code == 101:
                raise BadResponse("101 Switching Protocols, which was not asked for")
            return True  # informational: the real answer follows
        self.status, self.headers = code, headers
        self._frame(status[1] == b"1", headers)
        return True

    def _frame(self, http11: bool, headers: list[tuple[str, str]]) -> None:
        """Choose the body's framing from the head (RFC 9112 section 6.3)."""
        close = not http11
        lengths: set[str] = set()
        codings: list[str] = []
        for name, value in headers:
            if name == "content-length":
                lengths.update(part.strip() for part in value.split(","))
            elif name == "transfer-encoding":
                codings.append(value.strip().lower())
            elif name == "connection" and "close" in (t.strip().lower() for t in value.split(",")):
                close = True
        self.reusable = not close
        if self._head_request or self.status in _NO_BODY:
            self._state = _DONE
        elif codings:
            if codings != ["chunked"]:
                raise BadResponse(f"unsupported Transfer-Encoding {', '.join(codings)[:40]!r}")
            if lengths:
                self.reusable = False  # both framings given: read as chunked, never reused
            self._state = _CHUNK_LINE
        elif lengths:
            if len(lengths) != 1:
                raise BadResponse("conflicting Content-Length values")
            length = lengths.pop()
            if not _LENGTH.fullmatch(length):
                raise BadResponse(f"bad Content-Length {length[:40]!r}")
            self._left = int(length)
            self._state = _LENGTH_BODY if self._left else _DONE
        else:
            self.reusable = False
            self._state = _UNTIL_CLOSE

    def _trailers(self) -> bool:
        buffer, at = self._buffer, self._at
        for empty in (b"\r\n", b"\n"):  # no trailer fields
            if buffer.startswith(empty, at):
                self._at = at + len(empty)
                self._state = _DONE
                return True
        lines = self._section("trailer section")
        if lines is None:
            return False
        _fields(lines, 0)  # checked, then dropped
        self._state = _DONE
        return True

    def _keep(self, piece: bytes) -> None:
        if self._kept < self._max_body and piece:
            self._chunks.append(piece)
            self._kept += len(piece)


def _fields(lines: list[bytes], start: int) -> list[tuple[str, str]]:
    """`name: value` lines from `lines[start:]`, names lower-cased; folded lines joined."""
    fields: list[tuple[str, str]] = []
    for line in lines[start:]:
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise BadResponse("continuation line before any header")
            name, value = fields[-1]
            more = line.strip(b" \t").decode("latin-1")
            fields[-1] = (name, f"{value} {more}" if value else more)
            continue
        match = _FIELD.fullmatch(line)
        if match is None:
            raise BadResponse(f"bad header line {line[:40]!r}")
        fields.append((match[1].decode("ascii").lower(), match[2].decode("latin-1")))
    return fields
