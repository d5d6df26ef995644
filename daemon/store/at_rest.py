"""Encryption at rest of payloads in the store (`[store] encryption`): AES-256-GCM, rotatable keys.

What is encrypted:
    every event payload (received, polled or produced by a transform) — which is also what each
    delivery sends — and the refresh tokens kept in `auth_tokens`. Ids, stream and sink names,
    timestamps, states, idempotency keys and error texts stay in clear: the daemon schedules by
    them, and `ferry ctl` shows them (error texts pass the masking and secret scrubbing of
    `[telemetry] mask` first).

Format:
    `!fe1.` + key id (16 hex digits) + `.` + base64(nonce ‖ ciphertext ‖ tag), as the row's
    payload. It is ASCII, so every read that passes payloads through SQLite's JSON functions
    (`CAST(payload AS TEXT)` inside `json_array`, see `daemon.store.outbox`) carries it unchanged, and
    the reader opens it in Python afterwards. A payload without the prefix is plaintext (written
    before encryption was turned on) and is read as it is; JSON never starts with `!`.
    The key id is HMAC-SHA256(key, "ferry store key id"), cut to 8 bytes: it names a key without
    revealing anything about it. The header is authenticated with the payload (AAD), so a row
    cannot be re-labelled with another key id.

Keys and rotation:
    `key` encrypts every new write; `previous_keys` are only read. To rotate: make the old key a
    previous key, set the new one, restart; once every row written with the old key is gone
    (delivered and pruned), drop it. The ids of the keys ever used to write are kept in the table
    `store_keys`; at start every one of them that still has rows must be configured, or the
    daemon refuses to start (`StoreKeyMissing`) before writing anything — a wrong or missing key
    is never discovered later as unreadable rows.

Threat model:
    a copied database file, backup or disk without the key reveals no payload. It does not
    protect against someone who can run code as the daemon's user (the key is in its memory),
    and it does not stop one row's ciphertext from being copied into another row.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Sequence
from typing import Any, Final, final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from daemon.config.auth import EncryptionConfig
from daemon.errors import StoreCorrupt, StoreKeyMissing

PREFIX: Final = b"!fe1."
_KID_LEN: Final = 16
_HEAD_LEN: Final = len(PREFIX) + _KID_LEN + 1
_NONCE: Final = 12


def parse_key(text: str, what: str) -> bytes:
    """A 256-bit key from its text: base64 (standard or URL-safe) or 64 hex digits."""
    text = text.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        key = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ValueError(
            f"{what}: expected a 256-bit key as base64 or 64 hex digits (e.g. `openssl rand -base64 32`)"
        )
    return key


def key_id(key: bytes) -> str:
    """The public name of a key (16 hex digits)."""
    return hmac.new(key, b"ferry store key id", hashlib.sha256).hexdigest()[:_KID_LEN]


@final
class Cipher:
    """Seals with the current key, opens with any configured key (see the module docstring)."""

    def __init__(self, current: bytes, previous: Sequence[bytes] = ()) -> None:
        self.kid = key_id(current)
        self._head = PREFIX + self.kid.encode() + b"."
        self._current = AESGCM(current)
        self._keys = {key_id(key).encode(): AESGCM(key) for key in previous}
        self._keys[self.kid.encode()] = self._current

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(kid.decode() for kid in self._keys)

    def __repr__(self) -> str:
        return f"<Cipher [current key {self.kid}, {len(self._keys)} key(s)]>"

    def seal(self, plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        head = self._head
        return head + base64.b64encode(nonce + self._current.encrypt(nonce, plaintext, head))

    def open(self, stored: bytes) -> bytes:
        """The plaintext of a stored payload (one without the prefix is plaintext already).

        Raises `StoreCorrupt` when it cannot be opened: an unknown key (cannot happen after the
        start-up check) or a damaged row. Never returns garbage.
        """
        if not stored.startswith(PREFIX):
            return stored
        head = stored[:_HEAD_LEN]
        aead = self._keys.get(head[len(PREFIX) : -1])
        if aead is None:
            raise StoreCorrupt(
                f"a payload is encrypted with key {head[len(PREFIX) : -1].decode()!r}, not configured"
            )
        try:
            raw = base64.b64decode(stored[_HEAD_LEN:])
            return aead.decrypt(raw[:_NONCE], raw[_NONCE:], head)
        except (binascii.Error, ValueError, InvalidTag):
            raise StoreCorrupt("an encrypted payload is damaged (authentication failed)") from None


def cipher_of(conn: Any) -> Cipher | None:
    """The cipher installed on `conn` (None: payloads are stored in clear)."""
    return getattr(conn, "cipher", None)


def seal(conn: Any, payload: bytes) -> bytes:
    cipher = getattr(conn, "cipher", None)
    return payload if cipher is None else cipher.seal(payload)


def opened(conn: Any, payload: bytes) -> bytes:
    cipher = getattr(conn, "cipher", None)
    return payload if cipher is None else cipher.open(payload)


def seal_text(conn: Any, text: str, _what: str = "") -> bytes:
    return seal(conn, text.encode())


def open_text(conn: Any, stored: bytes | str, _what: str = "") -> str:
    data = stored.encode() if isinstance(stored, str) else bytes(stored)
    if data.startswith(PREFIX) and cipher_of(conn) is None:
        raise StoreKeyMissing("a stored value is encrypted but no [store] encryption key is configured")
    return opened(conn, data).decode()


def build_cipher(config: EncryptionConfig | None) -> Cipher | None:
    """The cipher of `[store] encryption` (None when unset); `ValueError` for a malformed key."""
    if config is None:
        return None
    current = parse_key(config.key.value.reveal(), f"key {config.key.text}")
    previous = [parse_key(ref.value.reveal(), f"previous key {ref.text}") for ref in config.previous_keys]
    return Cipher(current, previous)
