"""Encryption at rest: payloads sealed in the file, read back in clear, keys checked at start."""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
from pathlib import Path

import pytest
import trio

from daemon.errors import StoreCorrupt, StoreKeyMissing
from daemon.store import at_rest, ops, outbox
from daemon.store.at_rest import Cipher, key_id, parse_key
from daemon.store.sqlite import Store

KEY_A, KEY_B = os.urandom(32), os.urandom(32)
MARK = b"PLAINTEXT-MARKER-4711"
PAYLOAD = b'{"note":"' + MARK + b'"}'


def test_keys_are_read_as_base64_or_hex_and_anything_else_is_refused() -> None:
    assert parse_key(base64.b64encode(KEY_A).decode(), "k") == KEY_A
    assert parse_key(base64.urlsafe_b64encode(KEY_A).decode(), "k") == KEY_A
    assert parse_key(KEY_A.hex(), "k") == KEY_A
    for bad in ("", "short", base64.b64encode(os.urandom(16)).decode(), "z" * 64):
        with pytest.raises(ValueError, match="expected a 256-bit key"):
            parse_key(bad, "k")


def test_seal_and_open() -> None:
    cipher = Cipher(KEY_A)
    sealed = cipher.seal(PAYLOAD)
    assert sealed.startswith(b"!fe1." + key_id(KEY_A).encode() + b".")
    assert MARK not in sealed
    assert sealed.isascii()
    assert cipher.open(sealed) == PAYLOAD
    assert cipher.seal(PAYLOAD) != sealed  # a fresh nonce every time
    assert cipher.open(PAYLOAD) == PAYLOAD  # rows from before encryption read as they are
    with pytest.raises(StoreCorrupt, match="not configured"):
        Cipher(KEY_B).open(sealed)
    tampered = sealed[:-6] + (b"AAAA==" if not sealed.endswith(b"AAAA==") else b"BBBB==")
    with pytest.raises(StoreCorrupt, match="damaged"):
        cipher.open(tampered)
    # The header is authenticated: relabelling a row with another configured key id fails.
    both = Cipher(KEY_B, [KEY_A])
    relabelled = sealed.replace(key_id(KEY_A).encode(), key_id(KEY_B).encode())
    with pytest.raises(StoreCorrupt, match="damaged"):
        both.open(relabelled)
    assert both.open(sealed) == PAYLOAD


async def _write_and_read(path: Path, cipher: Cipher | None) -> tuple[list[bytes], list[bytes]]:
    store = Store.open(path, durability="normal", cipher=cipher)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await store.call(lambda c: outbox.insert_event(c, "in", PAYLOAD, None, ["out"]))
            events = await store.call(lambda c: outbox.read_events(c, ["in"], 0, 100))
            due = await store.call(lambda c: outbox.due_deliveries(c, "out", 2e9, 100))
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    return [e.payload for e in events], [d.payload for d in due]


def _raw(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def _digest(path: Path) -> str:
    return hashlib.sha256(_raw(path)).hexdigest()


async def test_payloads_are_unreadable_in_the_file_and_clear_to_every_reader(tmp_path: Path) -> None:
    path = tmp_path / "ferry.db"
    events, due = await _write_and_read(path, Cipher(KEY_A))
    assert events == due == [PAYLOAD]  # both readers see plaintext
    assert MARK not in _raw(path)
    conn = sqlite3.connect(path)
    payloads = [row[0] for row in conn.execute("SELECT payload FROM events")]
    conn.close()
    assert all(p.startswith(b"!fe1.") for p in payloads)


async def test_dlq_show_opens_the_payload(tmp_path: Path) -> None:
    path = tmp_path / "ferry.db"
    await _write_and_read(path, Cipher(KEY_A))
    store = Store.open(path, durability="normal", cipher=Cipher(KEY_A))
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        (event_id,) = await store.call(lambda c: [r[0] for r in c.execute("SELECT id FROM events LIMIT 1")])
        shown = await store.call(lambda c: ops.show_delivery(c, f"{event_id}.out"))
        nursery.cancel_scope.cancel()
    store.close()
    assert shown is not None
    assert shown[1].payload == {"note": MARK.decode()}


async def test_a_missing_or_wrong_key_refuses_to_start_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ferry.db"
    await _write_and_read(path, Cipher(KEY_A))
    before = _digest(path)
    with pytest.raises(StoreKeyMissing, match=f"encrypted with key {key_id(KEY_A)}, which is not configured"):
        Store.open(path, cipher=None)
    with pytest.raises(StoreKeyMissing, match="wrong key"):
        Store.open(path, cipher=Cipher(KEY_B))
    assert _digest(path) == before
    # With the right key it opens, and earlier plaintext rows stay readable alongside.
    events, _ = await _write_and_read(path, Cipher(KEY_A))
    assert events == [PAYLOAD] * 2


async def test_rotation_reads_old_rows_writes_with_the_new_key_and_forgets_the_old_when_unused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ferry.db"
    await _write_and_read(path, Cipher(KEY_A))
    events, due = await _write_and_read(path, Cipher(KEY_B, [KEY_A]))
    assert events == [PAYLOAD] * 2
    assert due == [PAYLOAD] * 2
    conn = sqlite3.connect(path)
    heads = sorted(row[0][5:21].decode() for row in conn.execute("SELECT payload FROM events"))
    assert heads == sorted([key_id(KEY_A), key_id(KEY_B)])
    # Dropping the old key too early is refused…
    conn.close()
    with pytest.raises(StoreKeyMissing, match=key_id(KEY_A)):
        Store.open(path, cipher=Cipher(KEY_B))
    # …and allowed once no row needs it (its rows delivered and pruned).
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM events WHERE substr(payload, 6, 16) = ?", (key_id(KEY_A).encode(),))
    conn.commit()
    conn.close()
    Store.open(path, cipher=Cipher(KEY_B)).close()
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT kid FROM store_keys")] == [key_id(KEY_B)]
    conn.close()


async def test_a_plain_store_turned_encrypted_keeps_reading_its_old_rows(tmp_path: Path) -> None:
    path = tmp_path / "ferry.db"
    await _write_and_read(path, None)
    events, _ = await _write_and_read(path, Cipher(KEY_A))
    assert events == [PAYLOAD] * 2
    assert at_rest.cipher_of(sqlite3.connect(":memory:")) is None


def test_a_malformed_store_key_is_a_config_error_naming_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from daemon.config import root as cfg
    from daemon.errors import ConfigError

    monkeypatch.setenv("FERRY_TEST_STORE_KEY", "too-short-to-be-a-key")
    with pytest.raises(ConfigError) as caught:
        cfg.parse('[store.encryption]\nkey = "env:FERRY_TEST_STORE_KEY"\n')
    (problem,) = caught.value.problems
    assert problem.startswith("$.store.encryption: key env:FERRY_TEST_STORE_KEY: expected a 256-bit key")
    assert "too-short" not in problem
    monkeypatch.setenv("FERRY_TEST_STORE_KEY", KEY_A.hex())
    assert cfg.parse('[store.encryption]\nkey = "env:FERRY_TEST_STORE_KEY"\n').store.encryption is not None
