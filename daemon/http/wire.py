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
        self._buffer = self._buffer + data if self._buffer else data
        while self._state != _DONE:
            if not self._step():
                return False
        if self._buffer:
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
        """Advance by what the buffer holds; false when more bytes are needed."""
        state, buffer = self._state, self._buffer
        if state == _HEAD:
            return self._head()
        if state in (_LENGTH_BODY, _CHUNK_DATA):
            if not buffer:
                return False
            piece, self._buffer = buffer[: self._left], buffer[self._left :]
            self._keep(piece)
            self._left -= len(piece)
            if self._left == 0:
                self._state = _DONE if state == _LENGTH_BODY else _CHUNK_END
            return True
        if state == _UNTIL_CLOSE:
            self._keep(buffer)
            self._buffer = b""
            return False
        if state == _CHUNK_END:
            if len(buffer) < 2:
                return False
            if buffer[:2] != b"\r\n":
                raise BadResponse("chunk not followed by CRLF")
            self._buffer = buffer[2:]
            self._state = _CHUNK_LINE
            return True
        if state == _CHUNK_LINE:
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > MAX_CHUNK_LINE:
                    raise BadResponse("chunk size line too long")
                return False
            match = _CHUNK_SIZE.fullmatch(buffer, 0, end)
            if match is None:
                raise BadResponse(f"bad chunk size line {buffer[: min(end, 40)]!r}")
            self._buffer = buffer[end + 2 :]
            self._left = int(match[1], 16)
            self._state = _CHUNK_DATA if self._left else _TRAILERS
            return True
        return self._trailers()

    def _head(self) -> bool:
        buffer = self._buffer
        found = _HEAD_END.search(buffer)
        if found is None or found.start() > MAX_HEAD:
            if found is not None or len(buffer) > MAX_HEAD:
                raise BadResponse(f"response head over {MAX_HEAD} bytes")
            return False
        head, self._buffer = buffer[: found.start()], buffer[found.end() :]
        lines = _EOL.split(head)
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
        buffer = self._buffer
        if buffer[:1] == b"\n" or buffer[:2] == b"\r\n":  # no trailer fields
            self._buffer = buffer[1:] if buffer[:1] == b"\n" else buffer[2:]
            self._state = _DONE
            return True
        found = _HEAD_END.search(buffer)
        if found is None or found.start() > MAX_HEAD:
            if found is not None or len(buffer) > MAX_HEAD:
                raise BadResponse(f"trailer section over {MAX_HEAD} bytes")
            return False
        _fields(_EOL.split(buffer[: found.start()]), 0)  # checked, then dropped
        self._buffer = buffer[found.end() :]
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
