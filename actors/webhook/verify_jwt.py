"""The `jwt` verify scheme: a bearer JWT checked with PyJWT (a module of its own so that PyJWT and
`cryptography` are imported only when a source uses it).

Checks: the signature with one of `keys` (prepared once, at build) or the JWKS key named by the
token's `kid`; `exp` (required by default), `nbf` and `iat` with `leeway`; `aud` and `iss` when
configured. The algorithm must be one of `algorithms`: `none` is never accepted, and a token
signed with HS256 using a public key as the secret fails (PyJWT refuses PEM keys as HMAC secrets).
A `jti` makes the token a replay key until its `exp`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, final

import jwt

from actors.webhook.config import JwtVerify
from actors.webhook.verifier import PASSED, Headers, Unverified, Verified, header_value, replay_key
from daemon.errors import ConfigError

__all__ = ["JwtVerifier", "build_jwt"]


@final
class JwtVerifier:
    """A bearer JWT checked by PyJWT: signature, `exp`/`nbf`/`iat` (with `leeway`), `aud`, `iss`."""

    needs_body: bool = False
    challenge: bytes | None = b'Bearer realm="ferry"'

    def __init__(self, config: JwtVerify, keys: list[Any], by_kid: dict[str, Any]) -> None:
        self._config = config
        self._keys = keys
        self._by_kid = by_kid
        self._algorithms = list(config.algorithms)
        self._options: Any = {"require": list(config.require)}

    def __repr__(self) -> str:
        return f"<JwtVerifier {','.join(self._algorithms)} [{len(self._keys) + len(self._by_kid)} key(s)]>"

    def check(self, headers: Headers, body: bytes, now: float) -> Verified:
        value = header_value(headers, b"authorization")
        if not value:
            raise Unverified("credentials_missing", "missing authorization header")
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            raise Unverified("credentials_malformed", "authorization must be 'Bearer <token>'")
        claims = self._decode(token.strip())
        jti = claims.get("jti")
        if not self._config.replay or not isinstance(jti, str) or not jti:
            return PASSED
        expires = claims.get("exp")
        until = float(expires) if isinstance(expires, int | float) else now + self._config.tolerance
        return Verified(replay_key(b"jti", jti.encode()), max(until, now))

    def _decode(self, token: bytes) -> dict[str, Any]:
        config = self._config
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise Unverified("credentials_malformed", "bearer token is not a JWT") from None
        keys = [self._by_kid[kid]] if isinstance(kid, str) and kid in self._by_kid else self._keys
        if not keys:
            keys = list(self._by_kid.values())
        failure = Unverified("credentials_mismatch", "token signature does not match")
        for key in keys:
            try:
                return jwt.decode(
                    token,
                    key,
                    algorithms=self._algorithms,
                    audience=config.audience,
                    issuer=config.issuer,
                    leeway=config.leeway,
                    options=self._options,
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise Unverified("token_expired", "token has expired") from None
            except jwt.ImmatureSignatureError:
                raise Unverified("token_invalid", "token is not valid yet (nbf/iat)") from None
            except (jwt.InvalidAudienceError, jwt.InvalidIssuerError, jwt.MissingRequiredClaimError) as exc:
                raise Unverified("token_invalid", _claim_message(exc)) from None
            except jwt.InvalidAlgorithmError:
                raise Unverified("token_invalid", "token algorithm not accepted") from None
            except (jwt.InvalidKeyError, jwt.PyJWKError, TypeError, ValueError):
                failure = Unverified("credentials_mismatch", "token does not fit the configured keys")
            except jwt.PyJWTError:
                raise Unverified("credentials_malformed", "bearer token is not a valid JWT") from None
        raise failure


def _claim_message(exc: Exception) -> str:
    if isinstance(exc, jwt.InvalidAudienceError):
        return "token audience not accepted"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "token issuer not accepted"
    assert isinstance(exc, jwt.MissingRequiredClaimError)
    return f"token lacks the {exc.claim!r} claim"


def build_jwt(config: JwtVerify, where: str) -> JwtVerifier:
    algorithms = jwt.algorithms.get_default_algorithms()
    keys: list[Any] = []
    for index, ref in enumerate(config.keys):
        for name in config.algorithms:  # the first algorithm that can use this key prepares it once
            try:
                keys.append(algorithms[name].prepare_key(ref.value.reveal()))
                break
            except (jwt.InvalidKeyError, ValueError, TypeError):
                continue
        else:
            accepted = ", ".join(config.algorithms)
            raise ConfigError([f"{where}.keys[{index}]: {ref.text} is not a key for {accepted}"])
    by_kid: dict[str, Any] = {}
    if config.jwks_file is not None:
        try:
            document = json.loads(Path(config.jwks_file).read_text(encoding="utf-8"))
            keyset = jwt.PyJWKSet.from_dict(document)
        except OSError as exc:
            raise ConfigError(
                [f"{where}.jwks_file: cannot read {config.jwks_file}: {exc.strerror}"]
            ) from None
        except (ValueError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
            raise ConfigError([f"{where}.jwks_file: not a usable JWKS: {type(exc).__name__}"]) from None
        for number, key in enumerate(keyset.keys):
            by_kid[key.key_id or f"#{number}"] = key
    return JwtVerifier(config, keys, by_kid)
