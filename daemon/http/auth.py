"""Outbound authentication: what a sink, poller or lookup adds to each request it sends.

`build_auth(config, owner=…, store=…)` turns an `auth = { type = … }` table into an `Auth`:

    headers = await auth.headers()           # before each request
    url = with_query(url, auth.query)        # api_key in a query parameter
    if response.status == 401 and await auth.unauthorized(headers):
        headers = await auth.headers()       # one retry with a fresh token; a second 401 is
                                             # an ordinary failure

Static kinds (`api_key`, `basic`, `bearer`) cost nothing per request. Token kinds (`oauth2`,
`jwt_bearer`) keep one token in memory, fetched by a `daemon.http.tokens` source:

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
import logging
import os
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Final, Protocol, final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio

from daemon.config.auth import (
    ApiKeyAuth,
    AuthConfig,
    BasicAuth,
    BearerAuth,
    EncryptionConfig,
    JwtBearerAuth,
    OAuth2Auth,
    TlsConfig,
)
from daemon.errors import DeliveryError, RetryableDelivery
from daemon.http.client import HttpClient, LeanClient
from daemon.http.tokens import JwtSource, OAuth2Source, Token, TokenSource, load_private_key, scrub
from daemon.store import at_rest
from daemon.store.api import Outbox

log = logging.getLogger("ferry.auth")

FAILURE_HOLD: Final = 1.0  # seconds a failed token request is answered from memory


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
    store: Outbox | None = None,
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
