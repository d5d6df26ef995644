"""A fake OAuth 2.0 token endpoint and an API that only accepts its tokens: real HTTP on 127.0.0.1.

`TokenServer` answers `POST /token` for the client_credentials, refresh_token and JWT bearer
grants, counts every request, issues `access-N` tokens with `expires_in`, rotates refresh tokens
when asked (the old one stops working at once, as strict servers do), and can be told to be slow
or to fail. `TokenServer.api` is a responder for `FakeReceiver` that answers 401 to any request
without an unexpired token it issued.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from tests.fakes import FakeReceiver, Received, Reply


@dataclass
class Issued:
    token: str
    at: float
    expires_at: float


@dataclass
class TokenServer:
    """See the module docstring. Check `requests` (every token request's form) after a test."""

    client_id: str = "ferry-client"
    client_secret: str = "s3cret-client-value"
    expires_in: float | None = 3600
    rotate: bool = False
    refresh_tokens: set[str] = field(default_factory=set)
    delay: float = 0.0
    fail_with: Reply | None = None
    public_key: Any = None
    prefix: str = "access-"
    """Issued access tokens are `PREFIX` + a number."""
    requests: list[dict[str, str]] = field(default_factory=list)
    issued: list[Issued] = field(default_factory=list)
    deny: bool = False
    """`api` refuses every request (401) however valid its token."""
    refused: list[str] = field(default_factory=list)
    """The Authorization of every request `api` answered 401."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> TokenServer:
        self.receiver = FakeReceiver(self._answer).start()
        return self

    def stop(self) -> None:
        self.receiver.stop()

    @property
    def url(self) -> str:
        return f"{self.receiver.url}/token"

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def _answer(self, request: Received) -> Reply:
        form = dict(parse_qsl(request.body.decode()))
        with self.lock:
            self.requests.append({**form, "_authorization": request.headers.get("authorization", "")})
        if self.delay:
            time.sleep(self.delay)
        if self.fail_with is not None:
            return self.fail_with
        if not self._client_ok(request, form):
            return _error(401, "invalid_client", "client authentication failed")
        grant = form.get("grant_type")
        new_refresh = None
        if grant == "refresh_token":
            with self.lock:
                if form.get("refresh_token") not in self.refresh_tokens:
                    return _error(400, "invalid_grant", "refresh token unknown or already used")
                if self.rotate:
                    self.refresh_tokens.discard(form["refresh_token"])
                    new_refresh = f"{self.prefix}refresh-{len(self.requests)}-rotated"
                    self.refresh_tokens.add(new_refresh)
        elif grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            import jwt

            try:
                jwt.decode(
                    form.get("assertion", ""),
                    self.public_key,
                    algorithms=["RS256", "ES256"],
                    audience=self.url,
                )
            except jwt.PyJWTError as exc:
                return _error(400, "invalid_grant", f"bad assertion: {type(exc).__name__}")
        elif grant != "client_credentials":
            return _error(400, "unsupported_grant_type", str(grant))
        now = time.time()
        with self.lock:
            token = f"{self.prefix}{len(self.issued) + 1}"
            lifetime = self.expires_in if self.expires_in is not None else 10**9
            self.issued.append(Issued(token, now, now + lifetime))
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        if new_refresh is not None:
            answer["refresh_token"] = new_refresh
        return 200, {"content-type": "application/json"}, json.dumps(answer).encode()

    def _client_ok(self, request: Received, form: dict[str, str]) -> bool:
        header = request.headers.get("authorization", "")
        if header.startswith("Basic "):
            pair = base64.b64decode(header[6:]).decode()
            return pair == f"{self.client_id}:{self.client_secret}"
        if form.get("grant_type", "").startswith("urn:"):
            return True
        return form.get("client_id") == self.client_id and form.get("client_secret") == self.client_secret

    def revoke(self) -> None:
        """Every token issued so far stops working (the API answers 401 to it)."""
        with self.lock:
            for item in self.issued:
                item.expires_at = 0.0

    def valid(self, authorization: str | None) -> bool:
        """Whether `authorization` is `Bearer T` for a token T issued here and not yet expired."""
        if not authorization or not authorization.startswith("Bearer "):
            return False
        token, now = authorization[7:], time.time()
        with self.lock:
            return any(item.token == token and now < item.expires_at for item in self.issued)

    def api(self, request: Received) -> Reply:
        """A `FakeReceiver` responder: 200 for a valid token, else 401."""
        authorization = request.headers.get("authorization", "")
        if not self.deny and self.valid(authorization):
            return 200, {}, b'{"ok":true}'
        with self.lock:
            self.refused.append(authorization)
        return 401, {"www-authenticate": 'Bearer error="invalid_token"'}, b'{"error":"invalid_token"}'


def _error(status: int, code: str, description: str) -> Reply:
    body = json.dumps({"error": code, "error_description": description}).encode()
    return status, {"content-type": "application/json"}, body
