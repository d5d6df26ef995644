"""Pure parts of the fake API (tests/fake_api.py): its ETags, their weak comparison, its cursors."""

from __future__ import annotations

import base64
import bisect
import hashlib
import time
import zlib
from urllib.parse import urlencode


def etag_of(mode: str, weak: bool, body: bytes, link: str, query: dict[str, str], version: int) -> str | None:
    """The ETag of an answer as `FakeApi.etags` says ("body", "body_only", "version", "changing", "none")."""
    if mode == "none":
        return None
    if mode == "version":
        tag = f"v{version}-{zlib.crc32(urlencode(sorted(query.items())).encode()):08x}"
    elif mode == "changing":
        tag = f"n{time.monotonic_ns()}"
    else:
        digest = hashlib.blake2b(body, digest_size=10)
        if mode == "body":
            digest.update(link.encode())
        tag = digest.hexdigest()
    return f'W/"{tag}"' if weak else f'"{tag}"'


def weak_match(header: str | None, etag: str) -> bool:
    """`If-None-Match: header` against `etag` by weak comparison (RFC 9110 13.1.2)."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in header.split(","))


def key(entry: tuple[str, int]) -> str:
    """An opaque keyset cursor for `(updated_at, id)`."""
    return base64.urlsafe_b64encode(f"{entry[0]}|{entry[1]}".encode()).decode().rstrip("=")


def unkey(token: str) -> tuple[str, int]:
    try:
        updated, _, record_id = (
            base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode().partition("|")
        )
        return updated, int(record_id)
    except ValueError:
        return "", 0


def newest_first(
    order: list[tuple[str, int]], first: int, after: tuple[str, int] | None, skip: int, size: int
) -> tuple[list[tuple[str, int]], bool]:
    """A page of `order[first:]` read from its end (`direction=desc`), below `after` or past `skip`
    records: (its entries newest first, whether older ones follow)."""
    end = len(order) if after is None else min(len(order), bisect.bisect_left(order, after))
    start = max(first, end - skip - size)
    return order[start : end - skip][::-1], start > first
