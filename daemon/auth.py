"""Outbound authentication: what a sink, poller or lookup adds to each request it sends.

`build_auth(config, owner=…, store=…)` turns an `auth = { type = … }` table into an `Auth`:

    headers = await auth.headers()           # before each request
    url = with_query(url, auth.query)        # api_key in a query parameter
    if response.status == 401 and await auth.unauthorized(headers):
        headers = await auth.headers()       # one retry with a fresh token; a second 401 is
                                             # an ordinary failure

Static kinds (`api_key`, `basic`, `bearer`) cost nothing per request. Token kinds (`oauth2`,
`jwt_bearer`) keep one token in memory:

Caching and refresh:
    A token is used until `refresh_before` its expiry (from `expires_in`; at most half its
    lifetime early), then the first request to notice asks for a new one while the others keep
    using the still-valid token; only with no valid token do requests wait. A token with no
    `expires_in` is used until a 401.

Single flight:
    However many requests need a token at once, one token request is made; the others wait for
    its answer (or its failure: they all get the same error, and for a second no new attempt is
    made). A 401 forces one refresh, shared the same way by every request that got a 401 with
    the same token.

Rotation (`grant = "refresh_token"`):
    A refresh token the server sends back replaces the current one and is committed to the store
    (table `auth_tokens`, under the owner's name, encrypted when `[store] encryption` is on) before
    the new access token is used, so a crash right after never leaves ferry holding only a token
    the server has already retired. At start the stored token is used unless the configured one
    changed since (a fresh authorisation by the operator wins).

Errors:
    A failed token request (transport, timeout, non-2xx, an answer without `access_token`) raises
    `RetryableDelivery` naming the endpoint (scheme, host and path only) and the server's OAuth
    `error` code; the delivery is retried like any other failure. No message ever holds a
    secret: every secret value this auth knows is scrubbed from server-provided text.

Timeouts: every token request is bounded by the config's `timeout`.
Cancellation: `trio.Cancelled` passes through; a cancelled token request leaves no token and
lets the next caller try again.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import ssl
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, final
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import jwt
import msgspec
import trio

from . import at_rest
from .config_auth import (
    ApiKeyAuth,
    AuthConfig,
    BasicAuth,
    BearerAuth,
    EncryptionConfig,
    JwtBearerAuth,
    OAuth2Auth,
    TlsConfig,
)
from .errors import DeliveryError, RetryableDelivery, StoreError
from .http_client import HttpClient, LeanClient
from .secrets import SecretRef
from .store import Store

log = logging.getLogger("ferry.auth")

FAILURE_HOLD: Final = 1.0  # seconds a failed token request is answered from memory
JWT_BEARER_GRANT: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_MAX_TEXT: Final = 200


class Auth(Protocol):
    """Credentials for one component's outbound requests (see the module docstring)."""

    query: Mapping[str, str]
    """Query parameters every request's URL must carry (api_key in a query); usually empty."""

    async def headers(self) -> dict[str, str]:
        """The headers to add; may wait for (or make) one token request. Raises `DeliveryError`."""
        ...

    async def unauthorized(self, used: Mapping[str, str] | None = None) -> bool:
        """A request sent with `used` headers got a 401: True if a retry may help (a new token)."""
        ...

    async def aclose(self) -> None: ...


def build_auth(
    config: AuthConfig,
    *,
    owner: str,
    store: Store | None = None,
    clock: Callable[[], float] = time.monotonic,
    client: HttpClient | None = None,
) -> Auth:
    """The `Auth` for `config`. `owner` names the component (`sinks.crm`): the key of its
    persisted refresh token. `client` overrides the token endpoint's HTTP client (tests)."""
    if isinstance(config, ApiKeyAuth):
        key = config.key.value.reveal()
        if config.query is not None:
            return StaticAuth({}, {config.query: key})
        return StaticAuth({(config.header or "X-API-Key").lower(): config.prefix + key})
    if isinstance(config, BasicAuth):
        pair = f"{config.username}:{config.password.value.reveal()}".encode()
        return StaticAuth({"authorization": "Basic " + base64.b64encode(pair).decode("ascii")})
    if isinstance(config, BearerAuth):
        return StaticAuth({"authorization": "Bearer " + config.token.value.reveal()})
    if client is None:
        client = LeanClient(max_idle_per_host=2, ssl_context=ssl_context(config.tls))
    if isinstance(config, OAuth2Auth):
        return TokenAuth(OAuth2Source(config, owner, store, client), config.refresh_before, clock)
    if isinstance(config, JwtBearerAuth):
        return TokenAuth(JwtSource(config, client), config.refresh_before, clock)
    raise TypeError(f"no auth for {type(config).__name__}")


def with_query(url: str, params: Mapping[str, str]) -> str:
    """`url` with `params` added to (or replacing the same names in) its query."""
    if not params:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query.extend(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


@final
class StaticAuth:
    """Fixed headers and query parameters (api_key, basic, bearer)."""

    def __init__(self, headers: Mapping[str, str], query: Mapping[str, str] | None = None) -> None:
        self._headers = dict(headers)
        self.query: Mapping[str, str] = dict(query or {})

    def __repr__(self) -> str:
        return f"<StaticAuth [{', '.join(self._headers) or 'query'}]>"

    async def headers(self) -> dict[str, str]:
        return dict(self._headers)

    async def unauthorized(self, used: Mapping[str, str] | None = None) -> bool:
        return False

    async def aclose(self) -> None:
        return None


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


@final
class _Flight:
    __slots__ = ("done", "error", "token")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.token: Token | None = None
        self.error: DeliveryError | None = None


@final
class TokenAuth:
    """A cached bearer token from a `TokenSource`, refreshed early, one request at a time."""

    query: Mapping[str, str] = {}

    def __init__(self, source: TokenSource, refresh_before: float, clock: Callable[[], float]) -> None:
        self._source = source
        self._refresh_before = refresh_before
        self._clock = clock
        self._token: Token | None = None
        self._flight: _Flight | None = None
        self._failure: tuple[float, DeliveryError] | None = None
        self.requests = 0

    def __repr__(self) -> str:
        state = "no token" if self._token is None else "token"
        return f"<TokenAuth {self._source.description} [{state}, token requests: {self.requests}]>"

    async def headers(self) -> dict[str, str]:
        token = await self._current()
        return {"authorization": f"Bearer {token.access}"}

    async def unauthorized(self, used: Mapping[str, str] | None = None) -> bool:
        current = self._token
        if used is not None and current is not None:
            if used.get("authorization") != f"Bearer {current.access}":
                return True  # a newer token than the refused one is already here
        elif self._flight is not None:
            await self._join(self._flight)
            return True
        self._token = None
        self._failure = None
        await self._current()
        return True

    async def _current(self) -> Token:
        token, now = self._token, self._clock()
        if token is not None and now < token.refresh_at:
            return token
        usable = token is not None and now < token.expires_at
        if self._flight is not None:
            return token if usable and token is not None else await self._join(self._flight)
        if self._failure is not None and now < self._failure[0]:
            if usable and token is not None:
                return token
            raise self._failure[1]
        return await self._fly(token if usable else None)

    async def _fly(self, fallback: Token | None) -> Token:
        flight = self._flight = _Flight()
        self.requests += 1
        try:
            token = await self._source.fetch(self._clock(), self._refresh_before)
        except DeliveryError as exc:
            flight.error = exc
            self._failure = (self._clock() + FAILURE_HOLD, exc)
            if fallback is not None:
                log.warning(
                    "token refresh failed; the current token is still valid",
                    extra={"fields": {"auth": self._source.description, "error": str(exc)}},
                )
                return fallback
            raise
        except BaseException:
            flight.error = RetryableDelivery(f"{self._source.description}: token request interrupted")
            raise
        else:
            self._token = flight.token = token
            self._failure = None
        finally:
            self._flight = None
            flight.done.set()  # waiters run after this task's next checkpoint, token in place
        return token

    @staticmethod
    async def _join(flight: _Flight) -> Token:
        await flight.done.wait()
        if flight.token is not None:
            return flight.token
        assert flight.error is not None
        raise flight.error

    async def aclose(self) -> None:
        await self._source.aclose()


# -- token sources -------------------------------------------------------------------------------


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


def credential_values(headers: Mapping[str, str], query: Mapping[str, str]) -> list[str]:
    """Every form in which the credentials sent may come back in a receiver's answer."""
    values = [*query.values()]
    for value in headers.values():
        values.append(value)
        scheme, _, rest = value.partition(" ")
        if rest:
            values.append(rest)
            if scheme.lower() == "basic":
                with contextlib.suppress(ValueError):
                    values.extend(base64.b64decode(rest).decode().split(":", 1)[1:])
    return values


def scrub_error(error: DeliveryError, secrets: Iterable[str]) -> DeliveryError:
    """`error` with every value of `secrets` (and its URL-encoded form) replaced by `***`."""
    message = str(error)
    scrubbed = scrub(message, secrets)
    if scrubbed == message:
        return error
    return type(error)(scrubbed, status=error.status, retry_after=error.retry_after)


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

    def __init__(self, config: OAuth2Auth, owner: str, store: Store | None, client: HttpClient) -> None:
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
                stored = await self._store.call(lambda conn: load_refresh_token(conn, self._owner))
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
                await self._store.call(lambda conn: save_refresh_token(conn, self._owner, token, seed))
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


# -- persisted refresh tokens (table auth_tokens) -------------------------------------------------


def load_refresh_token(conn: Any, owner: str) -> tuple[str, str] | None:
    """The stored refresh token of `owner` and the fingerprint of the configured one it descends from."""
    row = conn.execute("SELECT token, seed FROM auth_tokens WHERE owner = ?", (owner,)).fetchone()
    if row is None:
        return None
    return at_rest.open_text(conn, row[0], f"auth_tokens:{owner}"), row[1]


def save_refresh_token(conn: Any, owner: str, token: str, seed: str) -> None:
    """Store `owner`'s current refresh token (encrypted when the store encrypts)."""
    conn.execute(
        "INSERT OR REPLACE INTO auth_tokens(owner, token, seed, updated_at) VALUES (?, ?, ?, ?)",
        (owner, at_rest.seal_text(conn, token, f"auth_tokens:{owner}"), seed, time.time()),
    )


# -- TLS -------------------------------------------------------------------------------------------


def ssl_context(tls: TlsConfig | None) -> ssl.SSLContext | None:
    """An `SSLContext` trusting `tls.ca` (else the system's CAs) and presenting `tls.cert`/`key`;
    None when `tls` is None (clients then use their default). TLS 1.2 at least.

    Raises `ValueError` naming the file (never the key) when something cannot be loaded.
    """
    if tls is None:
        return None
    try:
        context = ssl.create_default_context(cafile=tls.ca)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"ca {tls.ca}: cannot load CA certificates ({_ssl_reason(exc)})") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert is not None and tls.key is not None:
        key = tls.key.value.reveal().encode()
        fd = os.memfd_create("ferry-tls-key", os.MFD_CLOEXEC)  # the key never touches a disk
        try:
            os.write(fd, key)
            context.load_cert_chain(tls.cert, keyfile=f"/proc/self/fd/{fd}")
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cert {tls.cert}: cannot load the client certificate and key ({_ssl_reason(exc)})"
            ) from None
        finally:
            os.close(fd)
    return context


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__


def secret_errors(
    encryption: EncryptionConfig | None, components: Iterable[tuple[str, AuthConfig | None, TlsConfig | None]]
) -> list[str]:
    """Problems only the secrets' values show (a malformed store key, a PEM that is not a key, a
    client certificate that does not load), each with its TOML path; run once secrets are read."""
    errors: list[str] = []
    if encryption is not None:
        try:
            at_rest.build_cipher(encryption)
        except ValueError as exc:
            errors.append(f"$.store.encryption: {exc}")
    for path, auth, tls in components:
        for where, table in (("tls", tls), ("auth.tls", getattr(auth, "tls", None))):
            try:
                ssl_context(table)
            except ValueError as exc:
                errors.append(f"{path}.{where}: {exc}")
        if isinstance(auth, JwtBearerAuth):
            try:
                load_private_key(auth.private_key)
            except ValueError as exc:
                errors.append(f"{path}.auth.private_key: {exc}")
    return errors
