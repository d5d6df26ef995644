"""Where access tokens come from: OAuth 2.0 token endpoints and locally signed JWTs.

`daemon.http.auth.TokenAuth` caches and refreshes what a `TokenSource` fetches; this module does the
fetching. `OAuth2Source` asks a token endpoint (client_credentials or refresh_token grant) and
keeps a rotated refresh token in the store (table `auth_tokens`) before the access token that
came with it is used. `JwtSource` signs a JWT (PyJWT) that is the token itself or is traded at a
token endpoint (RFC 7523).

Errors: every failed token request raises `RetryableDelivery` naming the endpoint (scheme, host,
path) and the server's OAuth `error`, with every secret the source knows replaced by `***`.
Timeouts: every token request is bounded by the config's `timeout`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, final
from urllib.parse import quote, urlencode, urlsplit

import jwt
import msgspec

from daemon.config.auth import JwtBearerAuth, OAuth2Auth
from daemon.config.secrets import SecretRef
from daemon.errors import DeliveryError, RetryableDelivery, StoreError
from daemon.http.client import HttpClient
from daemon.store.api import Outbox

log = logging.getLogger("ferry.auth")

JWT_BEARER_GRANT: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_MAX_TEXT: Final = 200


@dataclass(frozen=True, slots=True)
class Token:
    """An access token and when to stop using it (clock time, `inf` when it did not say)."""

    access: str
    expires_at: float
    refresh_at: float


class TokenSource(Protocol):
    """Where tokens come from: a token endpoint, or a local signature."""

    description: str

    async def fetch(self, now: float, refresh_before: float) -> Token: ...

    def secrets(self) -> list[str]: ...

    async def aclose(self) -> None: ...


def make_token(access: str, now: float, lifetime: float | None, refresh_before: float) -> Token:
    """When a token obtained at `now` expires and when to refresh it (pure)."""
    if lifetime is None:
        return Token(access, float("inf"), float("inf"))
    early = min(refresh_before, lifetime / 2)
    return Token(access, now + lifetime, now + lifetime - early)


class _TokenAnswer(msgspec.Struct):
    access_token: str
    token_type: str = "Bearer"
    expires_in: float | str | None = None
    refresh_token: str | None = None


class _ErrorAnswer(msgspec.Struct):
    error: str | None = None
    error_description: str | None = None


def _endpoint(url: str) -> str:
    """A token URL as shown in messages: no user info, no query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret value (and its URL-encoded form) replaced by `***`."""
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
    return text


async def request_token(
    client: HttpClient,
    url: str,
    form: Mapping[str, str],
    *,
    headers: Mapping[str, str],
    timeout: float,
    secrets: list[str],
    what: str,
) -> _TokenAnswer:
    """POST a token request (form-encoded) and decode the answer; `RetryableDelivery` on failure."""
    where = f"{what} token request to {_endpoint(url)}"
    fields = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("accept", "application/json"),
        *headers.items(),
    ]
    try:
        response = await client.request(
            "POST", url, headers=fields, body=urlencode(form).encode(), timeout=timeout
        )
    except DeliveryError as exc:
        raise RetryableDelivery(f"{where} failed: {scrub(str(exc), secrets)}") from None
    if not 200 <= response.status < 300:
        reason = f"HTTP {response.status}"
        try:
            error = msgspec.json.decode(response.body, type=_ErrorAnswer)
            if error.error:
                reason += f" {error.error}"
            if error.error_description:
                reason += f": {error.error_description}"
        except msgspec.DecodeError:
            pass
        raise RetryableDelivery(
            f"{where} failed: {scrub(reason[:_MAX_TEXT], secrets)}", status=response.status
        )
    try:
        answer = msgspec.json.decode(response.body, type=_TokenAnswer)
    except msgspec.DecodeError as exc:
        raise RetryableDelivery(f"{where}: unusable answer ({scrub(str(exc), secrets)})") from None
    if not answer.access_token:
        raise RetryableDelivery(f"{where}: the answer has an empty access_token")
    return answer


def _lifetime(answer: _TokenAnswer) -> float | None:
    try:
        value = float(answer.expires_in) if answer.expires_in is not None else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None


def _fingerprint(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:32]


@final
class OAuth2Source:
    """Tokens from an OAuth 2.0 token endpoint (client_credentials or refresh_token grant)."""

    def __init__(self, config: OAuth2Auth, owner: str, store: Outbox | None, client: HttpClient) -> None:
        self._config = config
        self._owner = owner
        self._store = store
        self._client = client
        self.description = f"oauth2 {owner}"
        self._refresh: str | None = None  # the refresh token in use, once loaded
        self._seed = _reveal(config.refresh_token)

    def secrets(self) -> list[str]:
        return [s for s in (_reveal(self._config.client_secret), self._seed, self._refresh) if s]

    async def fetch(self, now: float, refresh_before: float) -> Token:
        config = self._config
        form: dict[str, str] = {"grant_type": config.grant}
        headers: dict[str, str] = {}
        secret = _reveal(config.client_secret)
        if config.client_auth == "basic" and secret is not None:
            pair = f"{quote(config.client_id, safe='')}:{quote(secret, safe='')}"
            headers["authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        else:
            form["client_id"] = config.client_id
            if secret is not None:
                form["client_secret"] = secret
        if config.grant == "refresh_token":
            form["refresh_token"] = await self._refresh_token()
        if config.scope:
            form["scope"] = config.scope
        form.update(config.params)
        answer = await request_token(
            self._client,
            config.token_url,
            form,
            headers=headers,
            timeout=config.timeout,
            secrets=self.secrets(),
            what="oauth2",
        )
        if answer.refresh_token and answer.refresh_token != self._refresh and config.grant == "refresh_token":
            await self._keep(answer.refresh_token)
        lifetime = _lifetime(answer)
        log.info(
            "oauth2 token obtained",
            extra={"fields": {"auth": self._owner, "expires_in": lifetime}},
        )
        return make_token(answer.access_token, now, lifetime, refresh_before)

    async def _refresh_token(self) -> str:
        if self._refresh is None:
            assert self._seed is not None  # config validation requires it for this grant
            stored = None
            if self._store is not None:
                stored = await self._store.load_refresh_token(self._owner)
            if stored is not None and stored[1] == _fingerprint(self._seed):
                self._refresh = stored[0]
            else:
                self._refresh = self._seed
        return self._refresh

    async def _keep(self, token: str) -> None:
        """Commit a rotated refresh token before anything uses the access token it came with."""
        if self._store is not None:
            assert self._seed is not None
            seed = _fingerprint(self._seed)
            try:
                await self._store.save_refresh_token(self._owner, token, seed)
            except StoreError as exc:
                raise RetryableDelivery(
                    f"{self.description}: cannot store the rotated refresh token: {exc}"
                ) from None
        self._refresh = token

    async def aclose(self) -> None:
        await self._client.aclose()


@final
class JwtSource:
    """A JWT signed here: the bearer token itself, or traded at `token_url` (RFC 7523)."""

    def __init__(self, config: JwtBearerAuth, client: HttpClient) -> None:
        self._config = config
        self._client = client
        self._key = load_private_key(config.private_key)
        self.description = f"jwt_bearer {config.issuer}"

    def secrets(self) -> list[str]:
        return [self._config.private_key.value.reveal()]

    def assertion(self, wall: float) -> str:
        """A freshly signed JWT (its `exp` is `lifetime` from `wall`, a Unix time)."""
        config = self._config
        claims: dict[str, Any] = {
            "iss": config.issuer,
            "sub": config.subject or config.issuer,
            "iat": int(wall),
            "exp": int(wall + config.lifetime),
            "jti": uuid.uuid4().hex,
            **config.claims,
        }
        audience = config.audience or config.token_url
        if audience:
            claims["aud"] = audience
        headers = {"kid": config.key_id} if config.key_id else None
        return jwt.encode(claims, self._key, algorithm=config.algorithm, headers=headers)

    async def fetch(self, now: float, refresh_before: float) -> Token:
        config = self._config
        signed = self.assertion(time.time())
        if config.token_url is None:
            return make_token(signed, now, config.lifetime, refresh_before)
        answer = await request_token(
            self._client,
            config.token_url,
            {"grant_type": JWT_BEARER_GRANT, "assertion": signed},
            headers={},
            timeout=config.timeout,
            secrets=[*self.secrets(), signed],
            what="jwt_bearer",
        )
        return make_token(answer.access_token, now, _lifetime(answer), refresh_before)

    async def aclose(self) -> None:
        await self._client.aclose()


def load_private_key(ref: SecretRef) -> Any:
    """The PEM private key behind `ref`; `ValueError` without quoting it when it is not one."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        return load_pem_private_key(ref.value.reveal().encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{ref.text}: not an unencrypted PEM private key ({type(exc).__name__})") from None


def _reveal(ref: SecretRef | None) -> str | None:
    return ref.value.reveal() if ref is not None else None
