"""Webhook verification: does this request come from the sender it claims, and is it new?

`build(config)` turns a source's `[sources.NAME.verify]` table into a `Verifier`; the listener
calls `verifier.check(headers, body, now)` with the raw request head and body before it parses
or stores anything. `check` returns a `Verified` (with the key that identifies the request for
replay protection) or raises `Unverified(reason, message)`: the listener answers 401 with the
message and counts the reason. No message names a secret, an expected signature or a key.

Order of checks:
    headers present and well-formed, then the signature (or credentials), then the signed
    timestamp against `tolerance`, both ways. The timestamp is judged only for a request whose
    signature holds, so "stale" is a clock-skew hint for a real sender, never an oracle.

Constant time:
    Signatures are compared with `hmac.compare_digest` after decoding; keys and passwords are
    compared as SHA-256 digests of both sides, so neither the content nor the length of a
    secret shows in the time an answer takes. Every secret is tried (rotation), whatever matched.

Replay:
    A verified request carries `replay_key`, a digest of what the sender signed (the body with
    its timestamp, or the webhook id, or a JWT's `jti`) and `replay_until`, when it stops
    mattering (the signed timestamp + `tolerance`, else now + `tolerance`). The store records
    it in the same transaction as the event (`outbox.insert_events`), so a request seen once
    is refused again even across a restart, and a commit that failed (503) leaves the sender
    free to retry. Without a signed timestamp or id, two legitimately identical bodies within
    `tolerance` look like a replay: such senders can set `replay = false`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

from actors.webhook.config import (
    ApiKeyVerify,
    BasicVerify,
    GithubVerify,
    HmacVerify,
    JwtVerify,
    ShopifyVerify,
    SlackVerify,
    StandardWebhooksVerify,
    StripeVerify,
    VerifyConfig,
)
from actors.webhook.verifier import (
    PASSED,
    Headers,
    Unverified,
    Verified,
    Verifier,
    header_value,
    replay_key,
)
from daemon.errors import ConfigError

__all__ = ["Unverified", "Verified", "Verifier", "build"]


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


# -- signatures -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Signed:
    """What one request presents: decoded signatures, and the timestamp and id it signed."""

    signatures: list[bytes]
    timestamp: bytes | None = None
    id: bytes | None = None


_Template = list[str | bytes]  # literal bytes, or a field name: body, timestamp, id


def _template(text: str) -> _Template:
    parts: _Template = []
    for literal, field, _, _ in string.Formatter().parse(text):
        if literal:
            parts.append(literal.encode())
        if field is not None:
            parts.append(field)
    return parts


@final
class SignatureVerifier:
    """HMAC signatures of a template over the body (every preset and the generic `hmac`)."""

    needs_body: bool = True
    challenge: bytes | None = None

    def __init__(
        self,
        keys: list[bytes],
        *,
        algorithm: str,
        template: str,
        extract: Callable[[Headers], _Signed],
        tolerance: float,
        replay: bool,
        replay_by_id: bool = False,
    ) -> None:
        self._keys = keys
        self._algorithm = algorithm
        self._template = _template(template)
        self._extract = extract
        self._tolerance = tolerance
        self._replay = replay
        self._replay_by_id = replay_by_id

    def __repr__(self) -> str:
        return f"<SignatureVerifier {self._algorithm} [{len(self._keys)} key(s)]>"

    def check(self, headers: Headers, body: bytes, now: float) -> Verified:
        signed = self._extract(headers)
        stamp = _unix_time(signed.timestamp) if signed.timestamp is not None else None
        fields = {"body": body, "timestamp": signed.timestamp or b"", "id": signed.id or b""}
        content = b"".join(part if isinstance(part, bytes) else fields[part] for part in self._template)
        matched = False
        for key in self._keys:  # every key, every signature: time does not depend on which matched
            expected = hmac.new(key, content, self._algorithm).digest()
            for signature in signed.signatures:
                matched |= hmac.compare_digest(expected, signature)
        if not matched:
            raise Unverified("signature_mismatch", "signature does not match")
        until = now + self._tolerance
        if stamp is not None:
            if stamp < now - self._tolerance:
                raise Unverified("timestamp_stale", f"signed timestamp is more than {self._tolerance:g}s old")
            if stamp > now + self._tolerance:
                raise Unverified(
                    "timestamp_future", f"signed timestamp is more than {self._tolerance:g}s in the future"
                )
            until = stamp + self._tolerance
        if not self._replay:
            return PASSED
        if self._replay_by_id and signed.id:
            return Verified(replay_key(b"id", signed.id), until)
        return Verified(replay_key(b"signed", content), until)


def _unix_time(value: bytes) -> float:
    if not value.isdigit() or len(value) > 12:
        raise Unverified("signature_malformed", "signed timestamp is not a Unix time in seconds")
    return float(int(value))


def _decode_signature(text: bytes, encoding: str) -> bytes:
    try:
        if encoding == "hex":
            return bytes.fromhex(text.decode("ascii"))
        return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raise Unverified("signature_malformed", f"signature is not {encoding}") from None


def _required(headers: Headers, name: bytes) -> bytes:
    value = header_value(headers, name)
    if not value:
        raise Unverified("signature_missing", f"missing {name.decode()} header")
    return value


def _prefixed(
    name: bytes, prefix: bytes, encoding: str, timestamp: bytes | None = None, id_: bytes | None = None
) -> Callable[[Headers], _Signed]:
    """`name: <prefix><signature>`, with an optional timestamp and id header."""

    def extract(headers: Headers) -> _Signed:
        value = _required(headers, name)
        if not value.startswith(prefix):
            raise Unverified("signature_malformed", f"{name.decode()} must start with {prefix.decode()!r}")
        signature = _decode_signature(value[len(prefix) :].strip(), encoding)
        stamp = _required(headers, timestamp) if timestamp else None
        ident = _required(headers, id_) if id_ else None
        return _Signed([signature], stamp, ident)

    return extract


def _stripe(headers: Headers) -> _Signed:
    value = _required(headers, b"stripe-signature")
    stamp, signatures = None, []
    for item in value.split(b","):
        key, sep, text = item.strip().partition(b"=")
        if not sep:
            raise Unverified("signature_malformed", "stripe-signature must be a list of key=value")
        if key == b"t":
            stamp = text
        elif key == b"v1":
            signatures.append(_decode_signature(text, "hex"))
    if stamp is None or not signatures:
        raise Unverified("signature_malformed", "stripe-signature needs t= and at least one v1=")
    return _Signed(signatures, stamp)


def _standard_webhooks(headers: Headers) -> _Signed:
    ident = _required(headers, b"webhook-id")
    stamp = _required(headers, b"webhook-timestamp")
    signatures = []
    for item in _required(headers, b"webhook-signature").split():
        version, sep, text = item.partition(b",")
        if not sep:
            raise Unverified("signature_malformed", "webhook-signature must be space-separated v1,<base64>")
        if version == b"v1":
            signatures.append(_decode_signature(text, "base64"))
    if not signatures:
        raise Unverified("signature_malformed", "webhook-signature has no v1 signature")
    return _Signed(signatures, stamp, ident)


def _whsec(secret: str, where: str) -> bytes:
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raise ConfigError([f"{where}: a standard-webhooks secret is whsec_<base64>"]) from None


# -- credentials ------------------------------------------------------------------------------------


@final
class ApiKeyVerifier:
    """A static key in a header; also `basic` (the header is then `Authorization: Basic …`)."""

    needs_body = False

    def __init__(
        self, header: bytes, prefix: bytes, keys: list[bytes], *, challenge: bytes | None = None
    ) -> None:
        self._header, self._prefix = header, prefix
        self._digests = [_digest(key) for key in keys]
        self.challenge: bytes | None = challenge

    def __repr__(self) -> str:
        return f"<ApiKeyVerifier {self._header.decode()} [{len(self._digests)} key(s)]>"

    def check(self, headers: Headers, body: bytes, now: float) -> Verified:
        value = header_value(headers, self._header)
        if not value:
            raise Unverified("credentials_missing", f"missing {self._header.decode()} header")
        if not value.startswith(self._prefix):
            raise Unverified(
                "credentials_malformed", f"{self._header.decode()} must start with {self._prefix.decode()!r}"
            )
        presented = _digest(value[len(self._prefix) :].strip())
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        if not matched:
            raise Unverified("credentials_mismatch", "credentials not accepted")
        return PASSED


def _basic(config: BasicVerify) -> ApiKeyVerifier:
    tokens = [base64.b64encode(f"{config.username}:{ref.value.reveal()}".encode()) for ref in config.secrets]
    return ApiKeyVerifier(b"authorization", b"Basic ", tokens, challenge=b'Basic realm="ferry"')


# -- building -------------------------------------------------------------------------------------


def _keys(config: Any) -> list[bytes]:
    return [ref.value.reveal_bytes() for ref in config.secrets]


def build(config: VerifyConfig, where: str = "verify") -> Verifier:
    """The verifier for one source's `verify` table; `ConfigError` (naming `where`) for unusable keys."""
    if isinstance(config, GithubVerify | ShopifyVerify | SlackVerify):
        extract = {
            GithubVerify: _prefixed(b"x-hub-signature-256", b"sha256=", "hex"),
            ShopifyVerify: _prefixed(b"x-shopify-hmac-sha256", b"", "base64"),
            SlackVerify: _prefixed(b"x-slack-signature", b"v0=", "hex", b"x-slack-request-timestamp"),
        }[type(config)]
        template = "v0:{timestamp}:{body}" if isinstance(config, SlackVerify) else "{body}"
        return SignatureVerifier(
            _keys(config),
            algorithm="sha256",
            template=template,
            extract=extract,
            tolerance=config.tolerance,
            replay=config.replay,
        )
    if isinstance(config, StripeVerify):
        return SignatureVerifier(
            _keys(config),
            algorithm="sha256",
            template="{timestamp}.{body}",
            extract=_stripe,
            tolerance=config.tolerance,
            replay=config.replay,
        )
    if isinstance(config, StandardWebhooksVerify):
        keys = [_whsec(ref.value.reveal(), f"{where}.secrets[{i}]") for i, ref in enumerate(config.secrets)]
        return SignatureVerifier(
            keys,
            algorithm="sha256",
            template="{id}.{timestamp}.{body}",
            extract=_standard_webhooks,
            tolerance=config.tolerance,
            replay=config.replay,
            replay_by_id=True,
        )
    if isinstance(config, HmacVerify):
        lower = [
            name.lower().encode() if name else None
            for name in (config.header, config.timestamp_header, config.id_header)
        ]
        return SignatureVerifier(
            _keys(config),
            algorithm=config.algorithm,
            template=config.signed,
            extract=_prefixed(lower[0] or b"", config.prefix.encode(), config.encoding, lower[1], lower[2]),
            tolerance=config.tolerance,
            replay=config.replay,
            replay_by_id="{id}" in config.signed,  # an id that is not signed could be changed at will
        )
    if isinstance(config, JwtVerify):
        from actors.webhook.verify_jwt import (
            build_jwt,  # PyJWT (and cryptography) load only when a source uses it
        )

        return build_jwt(config, where)
    if isinstance(config, BasicVerify):
        return _basic(config)
    if isinstance(config, ApiKeyVerify):
        return ApiKeyVerifier(config.header.lower().encode(), config.prefix.encode(), _keys(config))
    raise TypeError(f"no verifier for {type(config).__name__}")
