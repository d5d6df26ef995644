"""Fake destinations (and the Salesforce account API) for the CRM sync example, on 127.0.0.1.

    FakeHubSpot     POST /crm/v3/objects/contacts/batch/upsert  {"inputs": [{"idProperty": "email",
                    "id": EMAIL, "properties": {...}}, ...]}: at most 100 inputs, no id twice,
                    100 requests per rolling 10 s (more: 429 with HubSpot's body and headers);
                    `storm(seconds)` answers 429 to everything for a while (another integration
                    eating the shared quota). An email at a `.invalid` domain is refused as HubSpot
                    refuses an invalid email, and `refuse_once(email)` refuses one input once with a
                    transient error: with an `objectWriteTraceId` on every input (multi-status) the
                    others are written and the answer is a 207 naming the refused inputs by trace
                    id in `errors[]`; without, the whole batch is refused with a 400, as HubSpot does.
    FakeCrm         POST /api/contacts: one record `{"email", ...}` per request, upserted by email;
                    `outage(seconds)` answers 503 to everything for a while.
    FakeSalesforce  GET /services/data/v59.0/sobjects/Account/ID: `{"Id", "Name", "Industry"}`, 404
                    for an unknown id (the enrichment lookup).

Each stores what it was sent the way the real API would: the last write wins, whatever its
`LastModifiedDate` — which is why ferry's per-key ordering matters. Every accepted write is
logged with its arrival time (for latency), every request with its status (for quota use).

Run standalone for the demo (`python examples/crm-sync/fake_crms.py`): HubSpot on :9101,
the custom CRM on :9102, Salesforce on :9103.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = tuple[int, dict[str, str], Any]


@dataclass
class Write:
    """One record a destination accepted: its key, its version and when it arrived."""

    key: str
    version: str
    at: float


@dataclass
class FakeApi:
    """A threaded HTTP/1.1 server; subclasses answer in `handle(method, path, body)`."""

    port: int = 0
    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    writes: list[Write] = field(default_factory=list)
    statuses: list[tuple[float, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> FakeApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Head and body go out in two writes; Nagle + delayed ACK would add 40 ms to each.
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    status, headers, reply = 400, {}, {"status": "error", "message": "Invalid JSON"}
                else:
                    status, headers, reply = api.handle(self.command, self.path, body)
                with api.lock:
                    api.statuses.append((time.time(), status))
                data = json.dumps(reply).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 256

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client hanging up mid-request is expected (ferry killed or stopped)

        self.server = Server(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, method: str, path: str, body: Any) -> Reply:
        raise NotImplementedError

    def count(self, predicate: Callable[[int], bool] = lambda status: True) -> int:
        with self.lock:
            return sum(1 for _, status in self.statuses if predicate(status))

    def _store(self, key: str, record: dict[str, Any], version: str) -> None:
        """Upsert as the real API does: the last write wins."""
        with self.lock:
            self.state[key] = record
            self.writes.append(Write(key, version, time.time()))


class FakeHubSpot(FakeApi):
    """HubSpot's contacts batch upsert with its ten-secondly quota; see the module docstring."""

    PATH = "/crm/v3/objects/contacts/batch/upsert"
    QUOTA = 100
    WINDOW = 10.0

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self._recent: deque[float] = deque()
        self._storm_until = 0.0
        self.max_in_window = 0
        self._refuse_once: set[str] = set()
        self.inputs: list[str] = []  # every input's id, in the order requests brought them

    def storm(self, seconds: float) -> None:
        self._storm_until = time.monotonic() + seconds

    def refuse_once(self, email: str) -> None:
        """Refuse the next input for `email` with a transient error (a category the preset retries)."""
        with self.lock:
            self._refuse_once.add(email)

    def handle(self, method: str, path: str, body: Any) -> Reply:
        if method != "POST" or path != self.PATH:
            return 404, {}, {"status": "error", "message": f"no route {method} {path}"}
        now = time.monotonic()
        with self.lock:
            while self._recent and self._recent[0] <= now - self.WINDOW:
                self._recent.popleft()
            if now < self._storm_until or len(self._recent) >= self.QUOTA:
                return (
                    429,
                    self._limit_headers(0, 1),
                    {
                        "status": "error",
                        "message": "You have reached your ten_secondly_rolling limit.",
                        "errorType": "RATE_LIMIT",
                        "policyName": "TEN_SECONDLY_ROLLING",
                    },
                )
            self._recent.append(now)
            self.max_in_window = max(self.max_in_window, len(self._recent))
            remaining = self.QUOTA - len(self._recent)
        inputs = body.get("inputs") if isinstance(body, dict) else None
        problem = _batch_problem(inputs)
        if problem is not None:
            return 400, {}, {"status": "error", "category": "VALIDATION_ERROR", "message": problem}
        assert inputs is not None
        with self.lock:
            self.inputs.extend(item["id"] for item in inputs)
            errors = [_refusal(item, self._refuse_once) for item in inputs]
            self._refuse_once.difference_update(item["id"] for item in inputs)
        refused = [error for error in errors if error is not None]
        multi_status = all(isinstance(item.get("objectWriteTraceId"), str) for item in inputs)
        if refused and not multi_status:
            return 400, {}, {key: value for key, value in refused[0].items() if key != "context"}
        results = []
        for item, error in zip(inputs, errors, strict=True):
            if error is not None:
                continue
            properties = item["properties"]
            self._store(item["id"], properties, properties.get("sf_last_modified", ""))
            results.append({"id": item["id"], "properties": properties, "new": False})
        reply: dict[str, Any] = {"status": "COMPLETE", "results": results}
        if refused:
            reply |= {"numErrors": len(refused), "errors": refused}
        return (207 if refused else 200), self._limit_headers(remaining, 0), reply

    def _limit_headers(self, remaining: int, retry_after: int) -> dict[str, str]:
        headers = {
            "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
            "X-HubSpot-RateLimit-Max": str(self.QUOTA),
            "X-HubSpot-RateLimit-Remaining": str(remaining),
        }
        if retry_after:
            headers["Retry-After"] = str(retry_after)
        return headers


def _refusal(item: dict[str, Any], once: set[str]) -> dict[str, Any] | None:
    """HubSpot's error for one input it refuses (its documented multi-status shape), or None."""
    email = item["id"]
    trace = {"objectWriteTraceId": [item.get("objectWriteTraceId")]}
    if email.endswith(".invalid"):
        detail = {"isValid": False, "message": f"Email address {email} is invalid", "error": "INVALID_EMAIL"}
        message = f"Property values were not valid: {json.dumps([{**detail, 'name': 'email'}])}"
        return {"status": "error", "category": "VALIDATION_ERROR", "message": message, "context": trace}
    if email in once:
        message = "The contact is being updated by another request; try again"
        return {"status": "error", "category": "INTERNAL_ERROR", "message": message, "context": trace}
    return None


def _batch_problem(inputs: Any) -> str | None:
    if not isinstance(inputs, list) or not inputs:
        return "inputs: a non-empty list is required"
    if len(inputs) > 100:
        return f"inputs: at most 100 per request, got {len(inputs)}"
    ids = set()
    for index, item in enumerate(inputs):
        if (
            not isinstance(item, dict)
            or item.get("idProperty") != "email"
            or not isinstance(item.get("id"), str)
        ):
            return f"inputs[{index}]: idProperty must be email and id a string"
        if not isinstance(item.get("properties"), dict):
            return f"inputs[{index}].properties: an object is required"
        if item["id"] in ids:
            return f"Duplicate IDs found in batch input: [{item['id']}]"
        ids.add(item["id"])
    return None


class FakeCrm(FakeApi):
    """A custom CRM taking one contact per request; see the module docstring."""

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self._down_until = 0.0

    def outage(self, seconds: float) -> None:
        self._down_until = time.monotonic() + seconds

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def handle(self, method: str, path: str, body: Any) -> Reply:
        if self.down:
            return 503, {}, {"error": "service unavailable"}
        if method != "POST" or path != "/api/contacts":
            return 404, {}, {"error": f"no route {method} {path}"}
        if not isinstance(body, dict) or not isinstance(body.get("email"), str):
            return 422, {}, {"error": "email is required"}
        self._store(body["email"], body, body.get("updated_at", ""))
        return 200, {}, {"ok": True}


class FakeSalesforce(FakeApi):
    """Salesforce's REST API, for the Account a Contact belongs to."""

    PREFIX = "/services/data/v59.0/sobjects/Account/"

    def __init__(self, accounts: dict[str, dict[str, Any]], port: int = 0) -> None:
        super().__init__(port)
        self.accounts = accounts

    def handle(self, method: str, path: str, body: Any) -> Reply:
        account = self.accounts.get(path.removeprefix(self.PREFIX)) if path.startswith(self.PREFIX) else None
        if method != "GET" or account is None:
            return 404, {}, [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]
        return 200, {}, account


def accounts(count: int) -> dict[str, dict[str, Any]]:
    """`count` Salesforce accounts, ids `001000000000001AAA`, …"""
    industries = ("Banking", "Retail", "Energy", "Healthcare", "Media")
    return {
        f"001{n:012d}AAA": {"Id": f"001{n:012d}AAA", "Name": f"Account {n}", "Industry": industries[n % 5]}
        for n in range(1, count + 1)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hubspot", type=int, default=9101)
    parser.add_argument("--crm", type=int, default=9102)
    parser.add_argument("--salesforce", type=int, default=9103)
    args = parser.parse_args()
    apis = [FakeHubSpot(args.hubspot), FakeCrm(args.crm), FakeSalesforce(accounts(50), args.salesforce)]
    for api in apis:
        api.start()
        print(f"{type(api).__name__} on {api.url}", flush=True)
    try:
        while True:
            time.sleep(5)
            print(f"hubspot {len(apis[0].state)} contacts, crm {len(apis[1].state)} contacts", flush=True)
    except KeyboardInterrupt:
        for api in apis:
            api.stop()


if __name__ == "__main__":
    main()
