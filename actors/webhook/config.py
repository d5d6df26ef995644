"""Inbound security config: `[sources.NAME.verify]` (is this request from its sender?) and
`[listener] tls` (the listener's certificate).

One table per source, tagged by `scheme`. Every secret is a reference (`daemon.config.secrets`), and
every scheme that takes secrets takes a list, so a new secret can be added before the sender
switches to it and the old one removed after (rotation without a refused request).
The checks themselves live in `actors.webhook.verify`; docs/security.md shows each scheme's config.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from daemon.config.base import Section, default
from daemon.config.secrets import SecretRef
from daemon.config.units import Duration, Size

_HEADER = Annotated[str, Meta(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")]
_SECRETS_DOC = "Secret references (env:, file:, credential:); a request signed with any one of them passes."
_TOLERANCE_DOC = (
    "How far a signed timestamp may be from now, either way. Also how long a signature (or webhook id) "
    "is remembered to refuse a replay."
)
_REPLAY_DOC = (
    "Refuse (401) a request whose signature (or webhook id, or JWT `jti`) was already accepted within "
    "`tolerance`; remembered in the store, so a restart does not forget it."
)
TEMPLATE_FIELDS = frozenset({"body", "timestamp", "id"})
JwtAlgorithm = Literal[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"
]

Secrets = Annotated[list[SecretRef], Meta(min_length=1, description=_SECRETS_DOC)]
Tolerance = Annotated[Duration, Meta(description=_TOLERANCE_DOC)]
Replay = Annotated[bool, Meta(description=_REPLAY_DOC)]


class HmacVerify(Section, frozen=True, tag="hmac", tag_field="scheme"):
    """A generic HMAC signature in a header, over the body or a template such as `{timestamp}.{body}`."""

    secrets: Secrets
    header: Annotated[_HEADER, Meta(description="Header carrying the signature.")]
    algorithm: Annotated[Literal["sha1", "sha256", "sha512"], Meta(description="HMAC hash.")] = "sha256"
    encoding: Annotated[Literal["hex", "base64"], Meta(description="How the signature is written.")] = "hex"
    prefix: Annotated[str, Meta(description="Text before the signature in the header, e.g. `sha256=`.")] = ""
    signed: Annotated[
        str,
        Meta(
            description="What is signed: a template of `{body}`, `{timestamp}` (the `timestamp_header` "
            "value) and `{id}` (the `id_header` value), e.g. `{timestamp}.{body}`."
        ),
    ] = "{body}"
    timestamp_header: Annotated[
        _HEADER | None,
        Meta(description="Header with the signing time in Unix seconds; checked against `tolerance`."),
    ] = None
    id_header: Annotated[
        _HEADER | None,
        Meta(
            description="Header with the sender's message id, signed as `{id}`; with `replay`, the id "
            "(not the whole signed content) is remembered."
        ),
    ] = None
    tolerance: Tolerance = default(Duration(300))
    replay: Replay = True


class GithubVerify(Section, frozen=True, tag="github", tag_field="scheme"):
    """GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`."""

    secrets: Secrets
    tolerance: Tolerance = default(Duration(300))
    replay: Replay = True


class StripeVerify(Section, frozen=True, tag="stripe", tag_field="scheme"):
    """Stripe: `Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">` (several `v1` allowed)."""

    secrets: Secrets
    tolerance: Tolerance = default(Duration(300))
    replay: Replay = True


class SlackVerify(Section, frozen=True, tag="slack", tag_field="scheme"):
    """Slack: `X-Slack-Signature: v0=<hex HMAC-SHA256 of "v0:ts:body">`, `X-Slack-Request-Timestamp: ts`."""

    secrets: Secrets
    tolerance: Tolerance = default(Duration(300))
    replay: Replay = True


class StandardWebhooksVerify(Section, frozen=True, tag="standard-webhooks", tag_field="scheme"):
    """Standard Webhooks (standardwebhooks.com, Svix): `webhook-id`, `webhook-timestamp`, `webhook-signature`.

    The signature header holds space-separated `v1,<base64>` signatures of `id.timestamp.body`;
    secrets are `whsec_<base64>`. The webhook id is what `replay` remembers.
    """

    secrets: Secrets
    tolerance: Tolerance = default(Duration(300))
    replay: Replay = True


class ShopifyVerify(Section, frozen=True, tag="shopify", tag_field="scheme"):
    """Shopify: `X-Shopify-Hmac-Sha256: <base64 HMAC-SHA256 of the body>`."""

    secrets: Secrets
    tolerance: Tolerance = default(Duration(300))
    replay: Replay = True


class JwtVerify(Section, frozen=True, tag="jwt", tag_field="scheme"):
    """A JWT bearer token (`Authorization: Bearer <token>`), checked with PyJWT."""

    algorithms: Annotated[
        list[JwtAlgorithm],
        Meta(min_length=1, description="Algorithms accepted (never `none`); keys must match them."),
    ]
    keys: Annotated[
        list[SecretRef],
        Meta(
            description="HS* shared secrets, or RS*/ES*/PS* public keys in PEM (usually `file:`); "
            "any one passes."
        ),
    ] = []
    jwks_file: Annotated[
        str | None,
        Meta(
            description='A JWKS file (JSON `{"keys": [...]}`), re-read on reload; a token\'s `kid` '
            "picks the key."
        ),
    ] = None
    audience: Annotated[str | None, Meta(description="Required `aud`.")] = None
    issuer: Annotated[str | None, Meta(description="Required `iss`.")] = None
    require: Annotated[
        list[str], Meta(description="Claims every token must carry (`exp`, `nbf`, `iat` are then checked).")
    ] = default(["exp"])
    leeway: Annotated[Duration, Meta(description="Clock skew allowed for `exp`, `nbf` and `iat`.")] = default(
        Duration(30)
    )
    tolerance: Tolerance = default(Duration(300))
    replay: Annotated[
        bool,
        Meta(
            description="Refuse a token whose `jti` was already accepted (until its `exp`, or `tolerance`)."
        ),
    ] = True


class BasicVerify(Section, frozen=True, tag="basic", tag_field="scheme"):
    """HTTP Basic authentication (use it only over TLS)."""

    username: Annotated[str, Meta(min_length=1, description="The user name senders must give.")]
    secrets: Annotated[list[SecretRef], Meta(min_length=1, description="Passwords; any one passes.")]


class ApiKeyVerify(Section, frozen=True, tag="api_key", tag_field="scheme"):
    """A static key in a header (use it only over TLS)."""

    secrets: Annotated[list[SecretRef], Meta(min_length=1, description="Keys; any one passes.")]
    header: Annotated[_HEADER, Meta(description="Header carrying the key.")] = "X-API-Key"
    prefix: Annotated[str, Meta(description="Text before the key, e.g. `Bearer `.")] = ""


VerifyConfig = (
    HmacVerify
    | GithubVerify
    | StripeVerify
    | SlackVerify
    | StandardWebhooksVerify
    | ShopifyVerify
    | JwtVerify
    | BasicVerify
    | ApiKeyVerify
)


class ListenerTlsConfig(Section, frozen=True):
    """HTTPS on the listener: TLS 1.2 or later; the certificate and key are read again on every reload."""

    cert: Annotated[
        str,
        Meta(
            min_length=1,
            description="PEM certificate chain (the server's certificate first); relative paths resolve "
            "from the config's folder.",
        ),
    ]
    key: Annotated[
        SecretRef,
        Meta(description="The certificate's private key (PEM), as a secret reference (file:, credential:)."),
    ]
    min_version: Annotated[
        Literal["1.2", "1.3"],
        Meta(description="Oldest TLS version accepted; older clients fail the handshake."),
    ] = "1.2"


DOCUMENTED: list[tuple[str, type[Section]]] = [
    ("tls = { … } (in [listener])", ListenerTlsConfig),
    ('verify = { scheme = "hmac" }', HmacVerify),
    ('verify = { scheme = "github" }', GithubVerify),
    ('verify = { scheme = "stripe" }', StripeVerify),
    ('verify = { scheme = "slack" }', SlackVerify),
    ('verify = { scheme = "standard-webhooks" }', StandardWebhooksVerify),
    ('verify = { scheme = "shopify" }', ShopifyVerify),
    ('verify = { scheme = "jwt" }', JwtVerify),
    ('verify = { scheme = "basic" }', BasicVerify),
    ('verify = { scheme = "api_key" }', ApiKeyVerify),
]


def verify_errors(path: str, verify: VerifyConfig) -> Iterator[str]:
    """Checks the types cannot express (templates, keys that fit the algorithms)."""
    if isinstance(verify, HmacVerify):
        fields = set()
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(verify.signed) if name is not None}
        except ValueError as exc:
            yield f"{path}.signed: invalid template: {exc}"
        unknown = fields - TEMPLATE_FIELDS
        if unknown:
            names = ", ".join(sorted(unknown))
            yield f"{path}.signed: unknown field(s) {names}; use {{body}}, {{timestamp}}, {{id}}"
        if "body" not in fields and not unknown:
            yield f"{path}.signed: must include {{body}}"
        if "timestamp" in fields and verify.timestamp_header is None:
            yield f"{path}.signed: uses {{timestamp}} but timestamp_header is not set"
        if "id" in fields and verify.id_header is None:
            yield f"{path}.signed: uses {{id}} but id_header is not set"
        # an unsigned timestamp or id could be changed at will: checking it would protect nothing
        if verify.timestamp_header is not None and "timestamp" not in fields and not unknown:
            yield f"{path}.timestamp_header: set, but `signed` does not include {{timestamp}}"
        if verify.id_header is not None and "id" not in fields and not unknown:
            yield f"{path}.id_header: set, but `signed` does not include {{id}}"
    if isinstance(verify, JwtVerify):
        if not verify.keys and verify.jwks_file is None:
            yield f"{path}: give keys or jwks_file"
        shared = {a.startswith("HS") for a in verify.algorithms}
        if len(shared) > 1:
            yield f"{path}.algorithms: do not mix HS* (shared secret) with public-key algorithms"


def resolve_jwks(verify: VerifyConfig, base_dir: Path) -> VerifyConfig:
    """`verify` with a relative `jwks_file` made absolute from the config's folder."""
    if isinstance(verify, JwtVerify) and verify.jwks_file and not Path(verify.jwks_file).is_absolute():
        return msgspec.structs.replace(verify, jwks_file=str(base_dir / verify.jwks_file))
    return verify


class ListenerConfig(Section, frozen=True):
    """The HTTP/1.1 listener serving every webhook source at `POST /hooks/NAME`."""

    address: Annotated[str, Meta(description="`host:port` to listen on; port 0 picks a free port.")] = (
        "127.0.0.1:8080"
    )
    max_body: Annotated[Size, Meta(description="Largest request body accepted (413 above).")] = default(
        Size(1024**2)
    )
    max_header: Annotated[Size, Meta(description="Largest request head (line + headers) accepted.")] = (
        default(Size(16 * 1024))
    )
    max_depth: Annotated[
        int,
        Meta(
            ge=1,
            le=256,
            description="Deepest nesting of arrays and objects a JSON body may have; deeper bodies get "
            "400 before they are decoded. Every stage that walks an event (decoding, jq, masking, "
            "schema validation) recurses per level, so this keeps them far from Python's recursion "
            "limit (docs/limits.md#limits-at-the-door).",
        ),
    ] = 64
    max_connections: Annotated[
        int,
        Meta(
            ge=1,
            description="Open connections at once. At the limit a new connection closes the one that "
            "has waited longest for its client (idle, or sending slowly); when every one has a request "
            "being stored, the new one is answered 503 and closed.",
        ),
    ] = 1024
    max_pending: Annotated[
        int,
        Meta(
            ge=1,
            description="Requests waiting for their commit at once; beyond it a request is answered "
            "503 with `Retry-After: 1` and nothing of it is stored (load shedding: accepted requests "
            "keep a bounded wait when the store falls behind).",
        ),
    ] = 512
    header_timeout: Annotated[Duration, Meta(description="Time allowed to receive a request's head.")] = (
        default(Duration(10))
    )
    body_timeout: Annotated[Duration, Meta(description="Time allowed to receive a request's body.")] = (
        default(Duration(30))
    )
    idle_timeout: Annotated[
        Duration, Meta(description="How long a keep-alive connection may sit idle between requests.")
    ] = default(Duration(60))
    tls: Annotated[
        ListenerTlsConfig | None,
        Meta(
            description="Serve HTTPS with this certificate and key (table below); a reload re-reads "
            "them (the one `[listener]` key a reload applies). Unset: plain HTTP."
        ),
    ] = None


class WebhookSourceConfig(Section, frozen=True, tag="webhook", tag_field="type"):
    """Receives events at `POST /hooks/NAME` (or `path`); answers 202 once the event is committed."""

    path: (
        Annotated[str, Meta(pattern=r"^/[A-Za-z0-9/_.-]*$", description="URL path; default `/hooks/NAME`.")]
        | None
    ) = None
    idempotency_header: Annotated[
        str | None,
        Meta(
            description="Request header whose value de-duplicates deliveries of the same webhook; "
            "a repeat answers the original event id and stores nothing. Empty to disable."
        ),
    ] = "Idempotency-Key"
    verify: Annotated[
        VerifyConfig | None,
        Meta(
            description="Check each request's signature or credentials before it is read further "
            "(401 and nothing stored when it fails); see the `verify` tables below and docs/security.md."
        ),
    ] = None


def webhook_path(name: str, source: WebhookSourceConfig) -> str:
    """The URL path a webhook source is served at."""
    return source.path or f"/hooks/{name}"
