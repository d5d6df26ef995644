"""OAuth2 refresh tokens that rotate (`auth_tokens`): kept across restarts, sealed like payloads."""

from __future__ import annotations

import time

from daemon.store.at_rest import open_text, seal_text
from daemon.store.outbox import Connection


def load_refresh_token(conn: Connection, owner: str) -> tuple[str, str] | None:
    """The stored refresh token of `owner` and the fingerprint of the configured one it descends from."""
    row = conn.execute("SELECT token, seed FROM auth_tokens WHERE owner = ?", (owner,)).fetchone()
    if row is None:
        return None
    return open_text(conn, row[0], f"auth_tokens:{owner}"), row[1]


def save_refresh_token(conn: Connection, owner: str, token: str, seed: str) -> None:
    """Store `owner`'s current refresh token (encrypted when the store encrypts)."""
    conn.execute(
        "INSERT OR REPLACE INTO auth_tokens(owner, token, seed, updated_at) VALUES (?, ?, ?, ?)",
        (owner, seal_text(conn, token, f"auth_tokens:{owner}"), seed, time.time()),
    )
