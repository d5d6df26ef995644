"""A fake upstream REST API: a real HTTP/1.1 server on 127.0.0.1 that pollers and sinks talk to.

It serves one data set of records, sorted by `(updated_at, id)`, in every pagination style a
poller meets, and misbehaves on cue:

    GET /link/items?limit=N[&after=K][&updated_since=T]    a JSON array; `Link: <…>; rel="next"`
    GET /cursor/items?limit=N[&cursor=C][&updated_since=T] `{"data": […], "next_cursor": C|null}`
    GET /page/items?per_page=N[&page=P][&updated_since=T]  `{"data": […]}`, pages from 1, short last page
    GET /offset/items?limit=N[&offset=O][&updated_since=T] `{"data": […]}`, short last page
    (each also takes `direction=desc`: newest first, as GitHub's `sort=updated&direction=desc`)
    POST /jobs                 202 `{"id", "state": "queued", "status_url"}` (+ `Location`)
    GET /jobs/ID               `{"id", "state": "running"}` for `job_polls` polls, then
                               `{"id", "state": "done", "result": {"input": <posted body>}}`
    anything else (any method) 200 `{"ok": true}`, so a sink can deliver to it

Records are `{"id": n, "name": "item-n", "updated_at": "2026-01-01T00:00:07Z"}`; `updated_at`
advances one second every `per_second` records, so several records share a timestamp (what
an overlap window must cope with). `updated_since=T` keeps records with `updated_at >= T`
(inclusive, as most APIs do). `add()` appends records, `touch()` gives records a new
`updated_at` (they move to the end), `edit()` renames records where they are; each changes
the Last-Modified.

Conditional requests: a 200 on an items path carries `Last-Modified` (the last change) and an
`ETag` as `etags` says (`fake_api_parts.etag_of`; default: a hash of the page's body and `Link`);
`If-None-Match` is compared weakly (RFC 9110 13.1.2); a match, or with no `If-None-Match` an
`If-Modified-Since` not older than the last change, gets 304 with no body.

Quota, as GitHub counts it: every answer but a 304 spends one (`spent`; `not_modified` counts
304s). `quota = (n, seconds)` allows n spent in any sliding window of `seconds`; beyond it the
answer is 429 with `Retry-After` (whole seconds, rounded up). `retry_after_date = True` sends an
HTTP-date instead; `ratelimit_headers = True` adds `RateLimit-Limit/Remaining/Reset` (and the
`X-RateLimit-*` twins) to every answer.

Faults, consumed first in, first out by the next matching request (`fault(kind, times, path)`):
    "hang"          read the request, never answer (until `hang_seconds` or `stop()`)
    "close"         read the request, close the connection without answering
    "html"          200 `text/html` error page
    "garbage"       200 `application/json` that is not JSON
    "shape"         200 JSON of the wrong shape (`{"unexpected": true}`; an object for link)
    "repeat"        a next page that names the page just served (link and cursor styles)
    "500", "503"    that status with a JSON error body
    "429"           429 with `Retry-After: fault_retry_after`

Every request is recorded (`requests`, `snapshot()`), with its arrival time (wall and
monotonic), its query and headers, the status it was answered with (-1: none) and when the
answer was written (`answered`, monotonic): what tells overlapping requests apart. A request is
recorded when its handler thread has read it, which can be after its client died: after a kill,
`wait_disconnected()` before counting what the dead client asked for.

Run standalone (`python -m tests.fake_api --records 100000 --port 0`) to serve from a
process of its own; it prints its URL on the first line of stdout.
"""

from __future__ import annotations

import argparse
import bisect
import email.utils
import json
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from tests.fake_api_parts import etag_of, newest_first, unkey, weak_match
from tests.fake_api_parts import key as _key
from tests.fakes import QuietHandler, serve, wait_requests

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
STYLES = ("link", "cursor", "page", "offset")
FAULTS = ("hang", "close", "html", "garbage", "shape", "repeat", "500", "503", "429")


def stamp(second: int) -> str:
    """The `updated_at` text of a record `second` seconds after the fake's epoch."""
    return (EPOCH + timedelta(seconds=second)).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ApiRequest:
    """One request the fake API received, and how it was answered."""

    at: float
    """`time.time()` on arrival."""
    monotonic: float
    """`time.monotonic()` on arrival (compare with the client's clock in the same process)."""
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    status: int = -1
    """The status answered; -1 while unanswered or when the connection was dropped."""
    answered: float | None = None
    """`time.monotonic()` once the answer was written (None: not yet, or dropped)."""

    def json(self) -> Any:
        return json.loads(self.body)


Reply = tuple[int, dict[str, str], bytes]


@dataclass
class _Fault:
    kind: str
    times: int
    path: str | None


@dataclass
class _Job:
    body: Any
    polls: int = 0


@dataclass
class FakeApi:
    """The fake upstream; `start()` it, read `url`, `stop()` it. See the module docstring."""

    records: int = 0
    """How many records exist at start (ids 1…records)."""
    page_size: int = 100
    """Page size when the request does not say."""
    max_page_size: int = 1000
    per_second: int = 10
    """Records sharing one `updated_at` second."""
    quota: tuple[int, float] | None = None
    retry_after_date: bool = False
    ratelimit_headers: bool = False
    hang_seconds: float = 60.0
    fault_retry_after: int = 1
    job_polls: int = 2
    """Status polls a job answers `running` before it is `done`."""
    job_state: str = "done"
    """What a job ends as (`done`, `failed`, or anything else to stay there)."""
    responder: Callable[[ApiRequest], Reply | None] | None = None
    """Consulted first for every request; returning None falls through to the normal answer."""
    etags: str = "body"  # "body", "body_only" (without `Link`), "version", "changing" or "none"
    weak_etags: bool = False  # sent as W/"…"
    spent: int = 0  # answers that count against the quota (all but 304s), quota set or not
    not_modified: int = 0  # 304 answers (free, as on GitHub)
    requests: list[ApiRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    connections: int = 0
    """Client connections open now (their handler threads not finished)."""

    def __post_init__(self) -> None:
        self._order: list[tuple[str, int]] = []  # (updated_at, id), sorted
        self._rows: dict[int, bytes] = {}  # id -> encoded record
        self._stamps: dict[int, str] = {}
        self._clock = 0  # records stamped so far: the next `updated_at` second is _clock // per_second
        self._version = 0
        self._changed = 0.0
        self._faults: deque[_Fault] = deque()
        self._answered: deque[float] = deque()
        self._jobs: dict[str, _Job] = {}
        self._release = threading.Event()
        self._next_id = 1
        self.add(self.records)

    # -- the data set ------------------------------------------------------------------------

    def add(self, count: int) -> list[int]:
        """Append `count` new records; their ids."""
        with self.lock:
            ids = list(range(self._next_id, self._next_id + count))
            self._next_id += count
            for record_id in ids:
                self._stamp(record_id)
            self._bump()
            return ids

    def touch(self, ids: list[int]) -> None:
        """Give existing records a new, later `updated_at` (they move to the end of the order)."""
        with self.lock:
            for record_id in ids:
                old = (self._stamps[record_id], record_id)
                del self._order[bisect.bisect_left(self._order, old)]
                self._stamp(record_id)
            self._bump()

    def edit(self, ids: list[int]) -> None:
        """Rename records where they stand (`name` gets a `'` more; `updated_at` and order kept)."""
        with self.lock:
            for record_id in ids:
                record = json.loads(self._rows[record_id])
                record["name"] += "'"
                self._rows[record_id] = json.dumps(record, separators=(",", ":")).encode()
            self._bump()

    def record(self, record_id: int) -> dict[str, Any]:
        """One record as the API serves it."""
        with self.lock:
            parsed: dict[str, Any] = json.loads(self._rows[record_id])
            return parsed

    @property
    def ids(self) -> list[int]:
        """Every record id, in the order the API serves them."""
        with self.lock:
            return [record_id for _, record_id in self._order]

    def _stamp(self, record_id: int) -> None:
        updated = stamp(self._clock // self.per_second)
        self._clock += 1
        self._stamps[record_id] = updated
        self._rows[record_id] = json.dumps(
            {"id": record_id, "name": f"item-{record_id}", "updated_at": updated}, separators=(",", ":")
        ).encode()
        bisect.insort(self._order, (updated, record_id))

    def _bump(self) -> None:
        self._version += 1
        # Last-Modified has one-second resolution; a change must never look older than the last.
        self._changed = max(math.floor(time.time()), math.floor(self._changed) + 1)

    # -- cues --------------------------------------------------------------------------------

    def fault(self, kind: str, times: int = 1, path: str | None = None) -> None:
        """Answer the next `times` requests (whose path starts with `path`, if given) with `kind`."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; one of {', '.join(FAULTS)}")
        with self.lock:
            self._faults.append(_Fault(kind, times, path))

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def release(self) -> None:
        """End every hanging request now (their connections close unanswered)."""
        self._release.set()
        self._release = threading.Event()

    # -- observing ---------------------------------------------------------------------------

    def snapshot(self) -> list[ApiRequest]:
        with self.lock:
            return list(self.requests)

    def wait_for(
        self, predicate: Callable[[list[ApiRequest]], bool], timeout: float = 60.0
    ) -> list[ApiRequest]:
        """Wait until `predicate(requests)` holds; fail with what was seen at the deadline."""
        return wait_requests(self.snapshot, predicate, timeout)

    def wait_disconnected(self, timeout: float = 30.0) -> list[ApiRequest]:
        """Wait until no client connection is open, then the requests: after a client was killed,
        every request it sent before dying is recorded (a handler thread may not have read the
        last one yet when the kill returns; it reads it, then the end of the connection)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if self.connections == 0:
                    return list(self.requests)
                open_now = self.connections
            if time.monotonic() > deadline:
                raise AssertionError(f"{open_now} connection(s) still open after {timeout}s")
            time.sleep(0.02)

    # -- serving -----------------------------------------------------------------------------

    def start(self, port: int = 0) -> FakeApi:
        api = self

        class Handler(QuietHandler):
            def setup(self) -> None:
                super().setup()  # TCP_NODELAY (QuietHandler)
                with api.lock:
                    api.connections += 1

            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    with api.lock:
                        api.connections -= 1

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                request = ApiRequest(
                    self.arrived,
                    time.monotonic() - (time.time() - self.arrived),
                    self.command,
                    parts.path,
                    dict(parse_qsl(parts.query, keep_blank_values=True)),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                with api.lock:
                    api.requests.append(request)
                reply = api._answer(request)
                if reply is None:  # hang up without answering
                    self.close_connection = True
                    return
                request.status = reply[0]
                try:
                    self.reply(*reply)
                finally:
                    request.answered = time.monotonic()  # written, or the client went away

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = serve(Handler, port)
        self.port = int(self.server.server_address[1])
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    # -- answers -----------------------------------------------------------------------------

    def _answer(self, request: ApiRequest) -> Reply | None:
        if self.responder is not None:
            reply = self.responder(request)
            if reply is not None:
                return reply
        with self.lock:
            limited = self._over_quota()
            fault = None if limited else self._take_fault(request.path)
            spending = time.monotonic()
            if limited is None and self.quota is not None:
                self._answered.append(spending)  # so that this answer's RateLimit-Remaining counts it
        if limited is not None:
            return limited
        reply = self._served(request, fault)
        with self.lock:
            if reply is None or reply[0] != 304:
                self.spent += 1
                return reply
            self.not_modified += 1
            if self.quota is not None:
                self._answered.remove(spending)  # a 304 is free
        return 304, reply[1] | self._ratelimit_headers(), reply[2]

    def _served(self, request: ApiRequest, fault: str | None) -> Reply | None:
        extra = self._ratelimit_headers()
        if fault is not None and fault != "repeat":
            return self._fault_reply(fault, extra)
        style = request.path.removeprefix("/").removesuffix("/items")
        if request.method == "GET" and request.path.endswith("/items") and style in STYLES:
            return self._items(style, request, extra, repeat=fault == "repeat")
        if request.path.startswith("/jobs"):
            return self._job(request, extra)
        return 200, {"Content-Type": "application/json", **extra}, b'{"ok":true}'

    def _over_quota(self) -> Reply | None:
        """429 when the quota is spent (the answer spends it, unless a 304); call with the lock held."""
        if self.quota is None:
            return None
        limit, per = self.quota
        now = time.monotonic()
        while self._answered and self._answered[0] <= now - per:
            self._answered.popleft()
        if len(self._answered) < limit:
            return None
        wait = max(1, math.ceil(self._answered[0] + per - now))
        retry_after = (
            email.utils.formatdate(time.time() + wait, usegmt=True) if self.retry_after_date else str(wait)
        )
        body = json.dumps({"error": "rate limit exceeded", "retry_after": wait}).encode()
        headers = {"Content-Type": "application/json", "Retry-After": retry_after}
        return 429, headers | self._ratelimit_headers(locked=True), body

    def _ratelimit_headers(self, *, locked: bool = False) -> dict[str, str]:
        if not self.ratelimit_headers or self.quota is None:
            return {}
        limit, per = self.quota
        if locked:
            used, oldest = len(self._answered), (self._answered[0] if self._answered else None)
        else:
            with self.lock:
                used, oldest = len(self._answered), (self._answered[0] if self._answered else None)
        reset = 0 if oldest is None else max(0, math.ceil(oldest + per - time.monotonic()))
        values = {"Limit": str(limit), "Remaining": str(max(0, limit - used)), "Reset": str(reset)}
        return {f"{prefix}RateLimit-{name}": value for prefix in ("", "X-") for name, value in values.items()}

    def _take_fault(self, path: str) -> str | None:
        for fault in self._faults:
            if fault.path is None or path.startswith(fault.path):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault.kind
        return None

    def _fault_reply(self, kind: str, extra: dict[str, str]) -> Reply | None:
        if kind == "hang":
            self._release.wait(self.hang_seconds)
            return None
        if kind == "close":
            return None
        if kind == "html":
            page = b"<!DOCTYPE html><html><body><h1>Service temporarily unavailable</h1></body></html>"
            return 200, {"Content-Type": "text/html; charset=utf-8", **extra}, page
        if kind == "garbage":
            return 200, {"Content-Type": "application/json", **extra}, b'{"data": [{"id": 1}, '
        if kind == "shape":
            return 200, {"Content-Type": "application/json", **extra}, b'{"unexpected": true}'
        if kind == "429":
            headers = {"Content-Type": "application/json", "Retry-After": str(self.fault_retry_after)}
            return 429, headers | extra, b'{"error":"slow down"}'
        status = int(kind)
        return status, {"Content-Type": "application/json", **extra}, b'{"error":"upstream trouble"}'

    def _items(self, style: str, request: ApiRequest, extra: dict[str, str], *, repeat: bool) -> Reply:
        query = request.query
        size_param = "per_page" if style == "page" else "limit"
        try:
            size = min(self.max_page_size, max(1, int(query.get(size_param, self.page_size))))
            page = int(query.get("page", "1"))
            offset = int(query.get("offset", "0"))
        except ValueError:
            return 400, {"Content-Type": "application/json"}, b'{"error":"bad number"}'
        with self.lock:
            since = query.get("updated_since")
            order = self._order
            first = bisect.bisect_left(order, (since, 0)) if since else 0
            after = {"link": query.get("after"), "cursor": query.get("cursor")}.get(style)
            if query.get("direction") == "desc":
                skip = 0 if after else (page - 1) * size if style == "page" else offset
                chosen, more = newest_first(order, first, unkey(after) if after else None, skip, size)
            else:
                if after:
                    first = max(first, bisect.bisect_right(order, unkey(after)))
                elif style == "page":
                    first += (page - 1) * size
                elif style == "offset":
                    first += offset
                chosen = order[first : first + size]
                more = first + size < len(order)
            rows = [self._rows[record_id] for _, record_id in chosen]
            version = self._version
            changed = self._changed
        modified = email.utils.formatdate(changed, usegmt=True)
        headers = {"Content-Type": "application/json", "Last-Modified": modified, **extra}
        listing = b"[" + b",".join(rows) + b"]"
        token = _key(chosen[-1]) if chosen and more else None
        if repeat and style in ("link", "cursor"):
            token, more = query.get("cursor") or query.get("after") or _key(("", 0)), True
        if style == "link":
            body = listing
            if more and token:
                next_query = {k: v for k, v in query.items() if k != "after"} | {"after": token}
                headers["Link"] = f'<{self.url}/link/items?{urlencode(next_query)}>; rel="next"'
        elif style == "cursor":
            cursor = json.dumps(token if more else None).encode()
            body = b'{"data":' + listing + b',"next_cursor":' + cursor + b"}"
        else:
            body = b'{"data":' + listing + b"}"
        etag = etag_of(self.etags, self.weak_etags, body, headers.get("Link", ""), query, version)
        if etag is not None:
            headers["ETag"] = etag
        if etag is not None and weak_match(request.headers.get("if-none-match"), etag):
            return 304, headers, b""
        since_header = request.headers.get("if-modified-since")
        if since_header and "if-none-match" not in request.headers:
            try:
                if email.utils.parsedate_to_datetime(since_header).timestamp() >= math.floor(changed):
                    return 304, headers, b""
            except (TypeError, ValueError):
                pass
        return 200, headers, body

    def _job(self, request: ApiRequest, extra: dict[str, str]) -> Reply:
        headers = {"Content-Type": "application/json", **extra}
        if request.method == "POST" and request.path == "/jobs":
            try:
                body = json.loads(request.body or b"null")
            except ValueError:
                return 400, headers, b'{"error":"body is not JSON"}'
            with self.lock:
                job_id = f"job-{len(self._jobs) + 1}"
                self._jobs[job_id] = _Job(body)
            queued = {"id": job_id, "state": "queued", "status_url": f"{self.url}/jobs/{job_id}"}
            return 202, headers | {"Location": f"/jobs/{job_id}"}, json.dumps(queued).encode()
        job_id = request.path.removeprefix("/jobs/")
        with self.lock:
            job = self._jobs.get(job_id)
            if job is None or request.method != "GET":
                return 404, headers, b'{"error":"no such job"}'
            job.polls += 1
            polls = job.polls
        if polls <= self.job_polls:
            return 200, headers, json.dumps({"id": job_id, "state": "running", "polls": polls}).encode()
        answer: dict[str, Any] = {"id": job_id, "state": self.job_state}
        if self.job_state == "done":
            answer["result"] = {"input": job.body}
        return 200, headers, json.dumps(answer).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_api", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    api = FakeApi(records=args.records, page_size=args.page_size).start(args.port)
    print(api.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
