"""Config of outbound authentication and TLS: `auth = { type = … }` and `tls = { … }`.

Any component that calls out over HTTP (the http sink, pollers, enrichment lookups) adds
`auth: AuthConfig | None = None` and `tls: TlsConfig | None = None`; `daemon.http.auth.build_auth`
turns the first into headers, `daemon.http.auth.ssl_context` the second into an `ssl.SSLContext`.
Every secret is a reference (`env:`, `file:`, `credential:`), see `daemon.config.secrets`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from daemon.config.base import Section, default
from daemon.config.secrets import SecretRef
from daemon.config.units import Duration

_URL = Meta(pattern=r"^https?://", description="Token endpoint URL (http or https).")
_HEADER = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"


class TlsConfig(Section, frozen=True):
    """TLS for outbound calls: a custom CA bundle and/or a client certificate (mTLS)."""

    ca: Annotated[
        str | None,
        Meta(
            description="PEM file of the CA certificates to trust instead of the system's; relative "
            "paths resolve from the config's folder."
        ),
    ] = None
    cert: Annotated[
        str | None,
        Meta(description="PEM client certificate (chain) presented to the server; needs `key`."),
    ] = None
    key: Annotated[
        SecretRef | None,
        Meta(description="The client certificate's private key (PEM), as a secret reference."),
    ] = None


class ApiKeyAuth(Section, frozen=True, tag="api_key", tag_field="type"):
    """A static API key in a header (default `X-API-Key`) or a query parameter."""

    key: Annotated[SecretRef, Meta(description="The API key (secret reference).")]
    header: Annotated[
        Annotated[str, Meta(pattern=_HEADER)] | None,
        Meta(description="Header carrying the key (default `X-API-Key`); unset when `query` is."),
    ] = None
    query: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        Meta(description="Query parameter carrying the key instead of a header."),
    ] = None
    prefix: Annotated[str, Meta(description='Text before the key in the header, e.g. `"Token "`.')] = ""


class BasicAuth(Section, frozen=True, tag="basic", tag_field="type"):
    """HTTP Basic authentication."""

    username: Annotated[str, Meta(min_length=1, description="User name (not a secret).")]
    password: Annotated[SecretRef, Meta(description="Password (secret reference).")]


class BearerAuth(Section, frozen=True, tag="bearer", tag_field="type"):
    """A static bearer token: `Authorization: Bearer TOKEN`."""

    token: Annotated[SecretRef, Meta(description="The token (secret reference).")]


class OAuth2Auth(Section, frozen=True, tag="oauth2", tag_field="type"):
    """OAuth 2.0 access tokens from a token endpoint, cached and refreshed before they expire.

    `client_credentials` asks for a token with the client's own credentials; `refresh_token`
    trades a refresh token for one, and when the server rotates the refresh token the new one is
    kept in the store (it survives restarts and crashes).
    """

    token_url: Annotated[str, _URL]
    client_id: Annotated[str, Meta(min_length=1, description="The client id (not a secret).")]
    grant: Annotated[
        Literal["client_credentials", "refresh_token"], Meta(description="The OAuth 2.0 grant used.")
    ] = "client_credentials"
    client_secret: Annotated[
        SecretRef | None, Meta(description="The client secret (secret reference); unset for a public client.")
    ] = None
    refresh_token: Annotated[
        SecretRef | None,
        Meta(
            description='The first refresh token (secret reference), for `grant = "refresh_token"`; '
            "a rotated one from the server is stored and used from then on, until this one changes."
        ),
    ] = None
    client_auth: Annotated[
        Literal["basic", "body"],
        Meta(description="How the client authenticates: HTTP Basic (`basic`) or form fields (`body`)."),
    ] = "basic"
    scope: Annotated[str | None, Meta(description="Space-separated scopes to ask for.")] = None
    params: Annotated[
        dict[str, str], Meta(description="Extra form fields of every token request (e.g. `audience`).")
    ] = {}
    refresh_before: Annotated[
        Duration,
        Meta(
            description="Refresh a token this long before it expires (at most half its lifetime "
            "before); requests keep using the old token meanwhile."
        ),
    ] = default(Duration(60))
    timeout: Annotated[Duration, Meta(description="Whole-request timeout of a token request.")] = default(
        Duration(10)
    )
    tls: Annotated[
        TlsConfig | None, Meta(description="TLS for the token endpoint; unset: the system's CAs.")
    ] = None


class JwtBearerAuth(Section, frozen=True, tag="jwt_bearer", tag_field="type"):
    """A JWT signed with a private key (RS256/ES256): sent as the bearer token itself, or, with
    `token_url`, exchanged for an access token (RFC 7523 JWT bearer grant)."""

    private_key: Annotated[SecretRef, Meta(description="PEM private key that signs (secret reference).")]
    issuer: Annotated[str, Meta(min_length=1, description="`iss` claim.")]
    algorithm: Annotated[
        Literal["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"],
        Meta(description="Signature algorithm."),
    ] = "RS256"
    subject: Annotated[str | None, Meta(description="`sub` claim; default: the issuer.")] = None
    audience: Annotated[str | None, Meta(description="`aud` claim; default: `token_url`, else none.")] = None
    key_id: Annotated[str | None, Meta(description="`kid` header of the JWT.")] = None
    claims: Annotated[dict[str, str], Meta(description="Extra claims (e.g. `scope`), strings.")] = {}
    lifetime: Annotated[Duration, Meta(description="How long each signed JWT is valid (`exp` - `iat`).")] = (
        default(Duration(300))
    )
    token_url: Annotated[
        Annotated[str, Meta(pattern=r"^https?://")] | None,
        Meta(description="Token endpoint to trade the JWT for an access token; unset: send the JWT itself."),
    ] = None
    refresh_before: Annotated[
        Duration, Meta(description="Re-sign / refresh this long before the token expires.")
    ] = default(Duration(60))
    timeout: Annotated[Duration, Meta(description="Whole-request timeout of a token request.")] = default(
        Duration(10)
    )
    tls: Annotated[
        TlsConfig | None, Meta(description="TLS for the token endpoint; unset: the system's CAs.")
    ] = None


AuthConfig = ApiKeyAuth | BasicAuth | BearerAuth | OAuth2Auth | JwtBearerAuth


def auth_errors(auth: AuthConfig | None, tls: TlsConfig | None, path: str) -> list[str]:
    """Cross-field problems of an `auth`/`tls` pair at TOML `path` (the component's table)."""
    errors: list[str] = []
    if isinstance(auth, ApiKeyAuth) and auth.header is not None and auth.query is not None:
        errors.append(f"{path}.auth: set `header` or `query`, not both")
    if isinstance(auth, OAuth2Auth):
        if auth.grant == "refresh_token" and auth.refresh_token is None:
            errors.append(f'{path}.auth.refresh_token: required with grant = "refresh_token"')
        if auth.grant == "client_credentials" and auth.client_secret is None:
            errors.append(f'{path}.auth.client_secret: required with grant = "client_credentials"')
        if auth.grant == "client_credentials" and auth.refresh_token is not None:
            errors.append(f'{path}.auth.refresh_token: only used with grant = "refresh_token"')
    for where, table in (("tls", tls), ("auth.tls", getattr(auth, "tls", None))):
        if isinstance(table, TlsConfig) and (table.cert is None) != (table.key is None):
            errors.append(f"{path}.{where}: `cert` and `key` go together")
    return errors


class EncryptionConfig(Section, frozen=True):
    """Encryption at rest of payloads in the store (AES-256-GCM); see docs/security.md."""

    key: Annotated[
        SecretRef,
        Meta(
            description="The 256-bit key that encrypts new writes, as base64 or 64 hex digits "
            "(`openssl rand -base64 32`), as a secret reference (e.g. `credential:ferry-store-key`)."
        ),
    ]
    previous_keys: Annotated[
        list[SecretRef],
        Meta(description="Older keys, only read: rows written with them stay readable during a rotation."),
    ] = []


S = TypeVar("S", bound=Section)


def resolve_tls(component: S, resolve: Callable[[str], str]) -> S:
    """`component` with the file paths of its `tls` (and its auth's `tls`) resolved by `resolve`."""

    def fix(tls: TlsConfig | None) -> TlsConfig | None:
        if tls is None:
            return None
        ca = resolve(tls.ca) if tls.ca is not None else None
        cert = resolve(tls.cert) if tls.cert is not None else None
        return msgspec.structs.replace(tls, ca=ca, cert=cert)

    changes: dict[str, Any] = {}
    tls = getattr(component, "tls", None)
    if isinstance(tls, TlsConfig):
        changes["tls"] = fix(tls)
    auth = getattr(component, "auth", None)
    if isinstance(auth, OAuth2Auth | JwtBearerAuth) and auth.tls is not None:
        changes["auth"] = msgspec.structs.replace(auth, tls=fix(auth.tls))
    return msgspec.structs.replace(component, **changes) if changes else component
