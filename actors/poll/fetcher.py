"""One poll source's HTTP: each request under its rate limit and auth, each answer checked, and
the next page's request sent ahead (`Ahead`) while the page in hand is worked on."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import final
from urllib.parse import urlsplit

import trio

from actors.poll.config import PollSourceConfig
from actors.poll.pages import excerpt
from daemon.errors import DeliveryError, PollError
from daemon.http.auth import Auth, credential_values, with_query
from daemon.http.client import HttpClient, LeanClient, Response, parse_retry_after
from daemon.limits.ratelimit import RateLimiter
from daemon.telemetry import metrics


@final
class Fetcher:
    """Sends a poll source's requests; `client` is set by the poller for each incarnation."""

    def __init__(
        self, name: str, config: PollSourceConfig, auth: Auth | None, limiter: RateLimiter | None
    ) -> None:
        self.name = name
        self._config = config
        self._auth = auth
        self._limiter = limiter
        self.client: HttpClient = LeanClient()
        self.sent: list[str] = []
        """The credentials of the last request, scrubbed from its errors."""
        self.requests = 0
        self.answered = 0
        """Answers not yet counted in `ferry.poll.requests` (the poller adds and resets it)."""

    async def fetch(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes = b""
    ) -> Response:
        """One request (with `auth`, and once more after a 401 that a new token may fix);
        any answer but 2xx or 304 raises `PollError`."""
        recorder = metrics.current().poll_requests
        auth = self._auth
        try:
            if auth is None:
                response = await self._send(method, url, headers, body)
            else:
                url = with_query(url, auth.query)
                credentials = await auth.headers()
                self.sent = credential_values(credentials, auth.query)
                response = await self._send(method, url, [*headers, *credentials.items()], body)
                if response.status == 401 and await auth.unauthorized(credentials):
                    credentials = await auth.headers()
                    self.sent = [*self.sent, *credential_values(credentials, auth.query)]
                    response = await self._send(method, url, [*headers, *credentials.items()], body)
        except DeliveryError as exc:
            recorder.add(1, {"source": self.name, "outcome": "error"})
            kind = "timeout" if str(exc).startswith("timed out") else "transport"
            raise PollError(f"{method} {where(url)}: {exc}", kind=kind) from None
        status = response.status
        if status == 304:
            recorder.add(1, {"source": self.name, "outcome": "not_modified"})
            return response
        if not 200 <= status < 300:
            recorder.add(1, {"source": self.name, "outcome": "error"})
            text = excerpt(response.body)
            raise PollError(
                f"{method} {where(url)}: HTTP {status}" + (f": {text}" if text else ""),
                kind=f"http_{status}",
                retry_after=parse_retry_after(response.header("retry-after")),
            )
        if len(response.body) > self._config.max_response:
            recorder.add(1, {"source": self.name, "outcome": "error"})
            raise PollError(
                f"{method} {where(url)}: response larger than max_response "
                f"({int(self._config.max_response)} bytes)",
                kind="too_large",
            )
        self.answered += 1
        return response

    async def _send(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> Response:
        """One request under the rate limit, its answer fed back to it. Raises `DeliveryError`."""
        if self._limiter is not None:
            await self._limiter.acquire(self.name)
        self.requests += 1
        response = await self.client.request(
            method, url, headers=headers, body=body, timeout=self._config.timeout
        )
        if self._limiter is not None:
            self._limiter.feedback(response.status, dict(response.headers))
        return response


def where(url: str) -> str:
    """A URL without its query (which may hold a key) for messages."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


@final
class Ahead:
    """The request for the next page, sent while the current one is keyed, encoded and committed.

    The next page's URL is known once a page is decoded; its request goes out at once, so the
    upstream's answer time overlaps ferry's work on the page in hand instead of adding to it.
    Nothing is stored from the answer before the page in hand was handed to the committer;
    when that page ends the listing (a bad item, a stuck cursor) the answer is dropped unread.
    """

    def __init__(self) -> None:
        self._done = trio.Event()
        self._sent = False
        self._response: Response | None = None
        self._error: PollError | None = None

    @classmethod
    async def start(cls, nursery: trio.Nursery, fetch: Callable[[], Awaitable[Response]]) -> Ahead:
        ahead = cls()
        nursery.start_soon(ahead._run, fetch)
        # The task runs without a pause from its start to writing the request: once it has
        # started, the request is out (or waiting for a permit of the rate limit).
        while not ahead._sent:
            await trio.lowlevel.checkpoint()
        return ahead

    async def _run(self, fetch: Callable[[], Awaitable[Response]]) -> None:
        self._sent = True
        try:
            self._response = await fetch()
        except PollError as exc:
            self._error = exc
        finally:
            self._done.set()

    async def response(self) -> Response:
        """The answer, or the `PollError` fetching it raised."""
        await self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._response is not None
        return self._response
