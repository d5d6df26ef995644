"""The lean client's HTTP/1.1 codec with bytes alone: what it sends, what it reads, what it refuses."""

from __future__ import annotations

import pytest

from daemon.http.wire import (
    MAX_HEAD,
    BadResponse,
    InvalidRequest,
    ResponseParser,
    check_target,
    encode_head,
)

# --- requests -------------------------------------------------------------------------


def test_head_is_the_request_line_and_fields_in_order() -> None:
    head = encode_head("POST", "/v1/x?a=1", [("Host", "api:8080"), ("Idempotency-Key", "d-1"), ("X-E", "")])
    assert head == b"POST /v1/x?a=1 HTTP/1.1\r\nHost: api:8080\r\nIdempotency-Key: d-1\r\nX-E: \r\n\r\n"


def test_values_may_hold_inner_blanks_and_visible_ascii() -> None:
    assert b"A: Bearer a.b-c~d/e+f=\r\n" in encode_head("GET", "/", [("A", "Bearer a.b-c~d/e+f=")])
    assert b"B: x \t y\r\n" in encode_head("GET", "/", [("B", "x \t y")])


@pytest.mark.parametrize(
    ("method", "fields"),
    [
        ("PO ST", []),
        ("", []),
        ("GET\r\nX", []),
        ("GET", [("X-Bad", "a\r\nInjected: 1")]),
        ("GET", [("X-Bad", "a\nb")]),
        ("GET", [("X-Bad", "a\rb")]),
        ("GET", [("X-Bad", "a\x00b")]),
        ("GET", [("X-Bad", " leading")]),
        ("GET", [("X-Bad", "trailing ")]),
        ("GET", [("X-Bad", "caf\u00e9")]),
        ("GET", [("X-Bad", "a\x0bb")]),
        ("GET", [("Bad Name", "v")]),
        ("GET", [("Bad:Name", "v")]),
        ("GET", [("", "v")]),
        ("GET", [("N\u00e4me", "v")]),
    ],
)
def test_an_invalid_method_or_field_is_refused(method: str, fields: list[tuple[str, str]]) -> None:
    with pytest.raises(InvalidRequest):
        encode_head(method, "/", fields)


def test_a_checked_name_is_still_checked_for_its_value() -> None:
    encode_head("GET", "/", [("X-Known", "fine")])
    with pytest.raises(InvalidRequest, match="X-Known"):
        encode_head("GET", "/", [("X-Known", "not\r\nfine")])


@pytest.mark.parametrize("target", ["/a b", "/caf\u00e9", "/a\r\nb", "", "/\x7f"])
def test_an_invalid_target_is_refused(target: str) -> None:
    with pytest.raises(InvalidRequest):
        check_target(target)


# --- responses ------------------------------------------------------------------------

SIMPLE = b'HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
    b"5;name=value\r\nhello\r\n1 \r\n,\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
)


def parse(data: bytes, *, pieces: int = 1, **kwargs: bool | int) -> ResponseParser:
    """`data` fed in `pieces` roughly equal parts (1: at once; len(data): byte by byte)."""
    parser = ResponseParser(**kwargs)  # type: ignore[arg-type]
    step = max(1, -(-len(data) // pieces))
    done = False
    for start in range(0, len(data), step):
        done = parser.feed(data[start : start + step])
    assert done == parser.done
    return parser


def feed_lines(parser: ResponseParser, line: bytes, times: int) -> None:
    for _ in range(times):
        assert not parser.feed(line)


@pytest.mark.parametrize("pieces", [1, 2, 3, 7, 10_000])
def test_a_length_framed_response_in_any_pieces(pieces: int) -> None:
    parser = parse(SIMPLE, pieces=pieces)
    assert parser.done
    assert parser.reusable
    assert parser.status == 201
    assert parser.headers == [("content-type", "application/json"), ("content-length", "11")]
    assert parser.body == b'{"ok":true}'


@pytest.mark.parametrize("pieces", [1, 2, 5, 10_000])
def test_a_chunked_response_with_extensions_and_trailers_in_any_pieces(pieces: int) -> None:
    parser = parse(CHUNKED, pieces=pieces)
    assert parser.done
    assert parser.reusable
    assert parser.body == b"hello, world"
    assert ("x-a", "1") in parser.headers
    assert ("x-trailer", "t") not in parser.headers


def test_a_chunked_response_without_trailers() -> None:
    parser = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n")
    assert parser.done
    assert parser.reusable
    assert parser.body == b"ab"


def test_not_done_until_the_framing_says_so() -> None:
    parser = ResponseParser()
    assert not parser.feed(SIMPLE[:-1])
    assert parser.feed(SIMPLE[-1:])
    parser = ResponseParser()
    assert not parser.feed(CHUNKED[:-2])
    assert parser.feed(CHUNKED[-2:])


def test_bare_lf_line_ends_and_a_missing_reason_are_accepted() -> None:
    parser = parse(b"HTTP/1.1 200\nContent-Length: 2\n\nok")
    assert (parser.status, parser.body, parser.reusable) == (200, b"ok", True)


def test_folded_lines_are_joined_with_a_space() -> None:
    parser = parse(b"HTTP/1.1 200 OK\r\nX-Long: a\r\n  b\r\n\tc\r\nContent-Length: 0\r\n\r\n")
    assert parser.headers[0] == ("x-long", "a b c")


def test_informational_answers_are_skipped() -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + SIMPLE
    for pieces in (1, len(data)):
        parser = parse(data, pieces=pieces)
        assert (parser.status, parser.body) == (201, b'{"ok":true}')
        assert ("link", "</a>") not in parser.headers


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_no_body_for_204_and_304(data: bytes) -> None:
    parser = parse(data)
    assert parser.done
    assert parser.reusable
    assert parser.body == b""


def test_no_body_for_a_head_request() -> None:
    parser = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n", head_request=True)
    assert parser.done
    assert parser.reusable
    assert parser.body == b""


def test_a_body_without_framing_runs_to_the_connection_end() -> None:
    parser = ResponseParser()
    assert not parser.feed(b"HTTP/1.1 200 OK\r\n\r\nsome")
    assert not parser.feed(b" more")
    parser.eof()
    assert parser.done
    assert not parser.reusable
    assert parser.body == b"some more"


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ],
)
def test_connections_that_must_not_be_reused(data: bytes) -> None:
    parser = parse(data)
    assert parser.done
    assert parser.body == b"ok"
    assert not parser.reusable


def test_bytes_after_the_response_are_never_read_as_the_next_one() -> None:
    parser = parse(SIMPLE + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert parser.done
    assert not parser.reusable
    assert parser.body == b'{"ok":true}'
    parser = parse(SIMPLE)
    assert parser.feed(b"x")
    assert not parser.reusable


def test_the_body_is_cut_to_max_body_and_read_to_its_end() -> None:
    body = b"0123456789" * 1000
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n" + body
    for pieces in (1, 13, 997):
        parser = parse(data, pieces=pieces, max_body=25)
        assert parser.done
        assert parser.reusable
        assert parser.body == body[:25]


def test_a_head_at_the_limit_is_read_and_one_over_it_is_refused() -> None:
    status = b"HTTP/1.1 200 OK\r\nX: "
    head = status + b"a" * (MAX_HEAD - len(status))  # status line and fields: MAX_HEAD bytes
    assert len(head) == MAX_HEAD
    assert parse(head + b"\r\n\r\n", head_request=True).headers == [("x", "a" * (MAX_HEAD - len(status)))]
    with pytest.raises(BadResponse, match="head over"):
        parse(head + b"a\r\n\r\n", head_request=True)
    parser = ResponseParser()
    with pytest.raises(BadResponse, match="head over"):  # never ends: refused once past the limit
        feed_lines(parser, b"X-Endless: " + b"a" * 989 + b"\r\n", MAX_HEAD // 1000 + 2)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "status line"),
        (b"\r\nHTTP/1.1 200 OK\r\n\r\n", "status line"),
        (b"HTTP/2 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 099 Odd\r\n\r\n", "status code"),
        (b"http/1.1 200 OK\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 O\x00K\r\n\r\n", "status line"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", "101"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nName : v\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\n: v\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\n folded first\r\n\r\n", "continuation"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc", "conflicting"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nabc", "conflicting"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", "CRLF"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2" + b" " * 2000, "too long"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n", "header line"),
    ],
)
def test_a_hostile_or_broken_response_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(BadResponse, match=reason):
        parse(data)


def test_an_endless_trailer_section_is_refused() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
    with pytest.raises(BadResponse, match="trailer section over"):
        feed_lines(parser, b"X-T: " + b"a" * 995 + b"\r\n", MAX_HEAD // 1000 + 2)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Le", "middle of the response head"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "before the end of the response body"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "before the end"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n", "before the end"),
    ],
)
def test_a_connection_closed_mid_response_is_refused(data: bytes, reason: str) -> None:
    parser = ResponseParser()
    assert not parser.feed(data)
    with pytest.raises(BadResponse, match=reason):
        parser.eof()


def test_eof_after_a_complete_response_changes_nothing() -> None:
    parser = parse(SIMPLE)
    parser.eof()
    assert parser.done
    assert parser.reusable
    assert parser.body == b'{"ok":true}'


def test_thousands_of_tiny_chunks_in_one_read() -> None:
    body = bytes(range(256)) * 80
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    data += b"".join(b"1\r\n%c\r\n" % byte for byte in body) + b"0\r\n\r\n"
    parser = parse(data, max_body=len(body))
    assert (parser.done, parser.reusable, parser.body) == (True, True, body)
