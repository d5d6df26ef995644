"""The pure parts of polling: reading a page, finding the next one, moving the high-water mark.

Nothing here does I/O or keeps state; `actors/poll/poller.py` strings these together and the
store keeps what must survive (`daemon/store/poll.py`). Every failure is a `PollError`
whose `kind` is the short name counted in metrics and shown by `ferry ctl status`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, final
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import jq
import msgspec

from actors.poll.config import CursorPaging, OffsetPaging, PagePaging, Paging, PollSourceConfig
from actors.poll.watermark import Watermark
from actors.poll.watermark import key_text as _key_text
from daemon.errors import PollError

__all__ = [
    "Opened",
    "Page",
    "PageReader",
    "PollStatus",
    "Watermark",
    "excerpt",
    "link_targets",
    "next_url",
    "with_params",
    "without_params",
]

_encode = msgspec.json.Encoder().encode
EXCERPT: Final = 120

# RFC 8288 link-value: "<" URI-Reference ">" *( OWS ";" OWS link-param ); values separated by ",".
_LINK_VALUE = re.compile(
    r"\s*<([^>]*)>((?:\s*;\s*[^;,=\s]+\s*(?:=\s*(?:\"(?:[^\"\\]|\\.)*\"|[^;,\s]*))?)*)\s*(?:,|$)"
)
_LINK_PARAM = re.compile(r";\s*([^;,=\s]+)\s*(?:=\s*(\"(?:[^\"\\]|\\.)*\"|[^;,\s]*))?")


def link_targets(values: list[str], base: str) -> dict[str, str]:
    """`rel` → absolute URL from `Link` header values (RFC 8288); the first link of each rel wins.

    A `rel` may name several relations (`rel="next last"`); names are case-insensitive;
    relative references resolve against `base` (the URL of the page that carried them).
    Malformed parts are skipped, never guessed at.
    """
    found: dict[str, str] = {}
    for value in values:
        position = 0
        while position < len(value):
            match = _LINK_VALUE.match(value, position)
            if match is None or match.end() == position:
                break
            position = match.end()
            target, params = match.group(1).strip(), match.group(2)
            for name, raw in _LINK_PARAM.findall(params):
                if name.lower() != "rel" or not raw:
                    continue
                rels = raw[1:-1] if raw.startswith('"') else raw
                for rel in rels.lower().split():
                    found.setdefault(rel, urljoin(base, target))
    return found


def with_params(url: str, params: dict[str, str]) -> str:
    """`url` with these query parameters set (replacing any of the same name, keeping the rest)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query.extend(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def without_params(url: str, names: set[str]) -> str:
    """`url` without the query parameters in `names`."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in names]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _param(url: str, name: str) -> str | None:
    for key, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if key == name:
            return value
    return None


def first_url(config: PollSourceConfig, since: str | None) -> str:
    """The URL of a cycle's first page: the configured one plus the mark and the first page's number."""
    params: dict[str, str] = {}
    if since is not None and config.since is not None:
        params[config.since.param] = since
    paging = config.pagination
    if isinstance(paging, PagePaging):
        params[paging.param] = str(paging.start)
    elif isinstance(paging, OffsetPaging):
        params[paging.param] = "0"
    if isinstance(paging, PagePaging | OffsetPaging) and paging.size_param is not None:
        params[paging.size_param] = str(paging.size)
    return with_params(config.url, params) if params else config.url


class PollStatus(msgspec.Struct, frozen=True):
    """A poll source as `ferry ctl status` shows it."""

    state: str  # starting | polling | job | waiting | backoff | paused
    mark: str | None  # the high-water mark of the last complete listing
    listing: bool  # a listing is in progress (resumes at its next page)
    job: bool  # a submitted job is being watched
    next_poll_in_s: float | None
    failures: int  # consecutive failed cycles (0: healthy)
    last_error: str | None
    last_error_kind: str | None
    last_success_at: float | None
    errors: dict[str, int]  # failed cycles by kind since start
    items: int  # new items stored since start
    duplicates: int  # items dropped as already stored
    requests: int
    not_modified: int  # 304 answers
    cycles: int  # complete listings since start


@final
@dataclass(frozen=True, slots=True)
class Page:
    """One page read: its items (JSON each), their keys, their marks, and the page's next cursor."""

    items: list[bytes]
    keys: list[str]
    marks: list[Any]
    cursor: Any


@final
@dataclass(frozen=True, slots=True)
class Opened:
    """A page half read (`PageReader.open`): its items as decoded and its cursor — enough to know
    the next page's URL (`next_url`) before the items are keyed and encoded (`PageReader.finish`)."""

    items: list[Any]
    cursor: Any
    read: Page | None = None  # the whole page, when one jq run read it


def excerpt(body: bytes) -> str:
    """The start of a response body, on one line, for an error message."""
    text = " ".join(body[: EXCERPT * 4].decode("utf-8", "replace").split())
    return text[:EXCERPT] + ("…" if len(text) > EXCERPT else "")


@final
class PageReader:
    """Reads pages: the items, their keys and marks, and the page's cursor.

    `[ITEMS]` must be exactly one array (anything else is a `bad_shape` error naming what
    came); each item must have a key (`no_key`). When `items`, `key`, the mark and the cursor
    are all plain paths (`.`, `.data`, `.meta.next`) the page is read with msgspec and those
    paths are followed in Python with jq's rules (a missing key is null; indexing anything but
    an object or null is an error): 5-10x cheaper than a jq run per page. Anything else runs
    as one jq program per page. Either way an item is stored as compact JSON.

    `read` is `open` (decode, the items array, the cursor: enough for the next page's URL)
    then `finish` (keys, marks, encoding), so the poller can ask for the next page in between.
    """

    def __init__(self, config: PollSourceConfig) -> None:
        mark_program = config.since.field if config.since is not None else None
        cursor_program = config.pagination.path if isinstance(config.pagination, CursorPaging) else None
        programs = [config.items, config.key, mark_program, cursor_program]
        paths = [None if program is None else _path(program) for program in programs]
        plain = all(path is not None for program, path in zip(programs, paths, strict=True) if program)
        self._paths = paths if plain else None
        mark, cursor = mark_program or "null", cursor_program or "null"
        self._program = jq.compile(
            f'[{config.items}] as $out | if ($out | length) != 1 or ($out[0] | type) != "array" '
            "then {shape: [$out[] | type]} else $out[0] as $items | "
            f"{{items: $items, keys: [$items[] | [{config.key}][0]], "
            f"marks: [$items[] | [{mark}][0]], cursor: ([{cursor}][0])}} end"
        )

    def read(self, body: bytes, content_type: str | None) -> Page:
        """The page in `body`; raises `PollError` (`not_json`, `bad_shape`, `no_key`, `jq`)."""
        return self.finish(self.open(body, content_type))

    def open(self, body: bytes, content_type: str | None) -> Opened:
        """The first half of `read`: the items array and the cursor. Raises `PollError` (`not_json`,
        `bad_shape`, `jq`); with a jq program, every error of `read` (it reads the whole page)."""
        paths = self._paths
        if paths is None:
            page = self._read_jq(body, content_type)
            return Opened(page.items, page.cursor, page)
        document = _decode(body, content_type)
        items_path, _, _, cursor_path = paths
        assert items_path is not None
        items = _follow(document, items_path, "items")
        if not isinstance(items, list):
            found = "null" if items is None else _TYPES.get(type(items), "value")
            raise PollError(f"`items` must give one array, got {found}: {excerpt(body)!r}", kind="bad_shape")
        cursor = _follow(document, cursor_path, "pagination.path") if cursor_path is not None else None
        return Opened(items, cursor)

    def finish(self, opened: Opened) -> Page:
        """The second half of `read`: each item's key and mark, and the item as compact JSON.
        Raises `PollError` (`no_key`, `jq`)."""
        if opened.read is not None:
            return opened.read
        assert self._paths is not None
        _, key_path, mark_path, _ = self._paths
        assert key_path is not None
        items = opened.items
        keys = [_follow(item, key_path, "key") for item in items]
        marks = (
            [_follow(item, mark_path, "since.field") for item in items]
            if mark_path is not None
            else [None] * len(items)
        )
        return _page(items, keys, marks, opened.cursor)

    def _read_jq(self, body: bytes, content_type: str | None) -> Page:
        try:
            (result,) = self._program.input_text(body.decode("utf-8")).all()
        except (ValueError, UnicodeDecodeError) as exc:
            _decode(body, content_type)  # raises the precise not_json error when that is the cause
            raise PollError(f"jq failed on the response: {exc}", kind="jq") from None
        if "shape" in result:
            found = ", ".join(result["shape"]) or "nothing"
            raise PollError(f"`items` must give one array, got {found}: {excerpt(body)!r}", kind="bad_shape")
        return _page(result["items"], result["keys"], result["marks"], result["cursor"])


_PATH = re.compile(r"^\.(?:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)?$")
_TYPES: Final = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
}


def _path(program: str) -> tuple[str, ...] | None:
    """The keys of a plain jq path (`.` → (), `.a.b` → ("a", "b")), or None for anything else."""
    program = program.strip()
    if not _PATH.match(program):
        return None
    return tuple(part for part in program[1:].split(".") if part)


def _follow(value: Any, path: tuple[str, ...], what: str) -> Any:
    """`value` down `path` with jq's rules: null for a missing key or a null, an error otherwise."""
    for key in path:
        if value is None:
            return None
        if not isinstance(value, dict):
            kind = _TYPES.get(type(value), "value")
            raise PollError(f'jq failed on the response: {what}: Cannot index {kind} with "{key}"', kind="jq")
        value = value.get(key)
    return value


def _decode(body: bytes, content_type: str | None) -> Any:
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        kind = f" ({content_type})" if content_type else ""
        raise PollError(f"response is not JSON{kind}: {exc}: {excerpt(body)!r}", kind="not_json") from None


def _page(items: list[Any], raw_keys: list[Any], marks: list[Any], cursor: Any) -> Page:
    keys: list[str] = []
    for index, raw in enumerate(raw_keys):
        key = _key_text(raw)
        if key is None:
            raise PollError(
                f"item {index} has no key (`key` gave null): {excerpt(_encode(items[index]))!r}",
                kind="no_key",
            )
        keys.append(key)
    return Page([_encode(item) for item in items], keys, marks, cursor)


def next_url(paging: Paging | None, url: str, page: Page | Opened, links: dict[str, str]) -> str | None:
    """The URL of the page after `page` (fetched from `url`), or None when the listing is complete."""
    if paging is None:
        return None
    if isinstance(paging, CursorPaging):
        cursor = page.cursor
        if cursor is None or cursor is False or cursor == "":
            return None
        return with_params(url, {paging.param: _key_text(cursor) or ""})
    if isinstance(paging, PagePaging | OffsetPaging):
        if len(page.items) < paging.size:
            return None
        current = _param(url, paging.param)
        start = paging.start if isinstance(paging, PagePaging) else 0
        try:
            position = int(current) if current is not None else start
        except ValueError:
            position = start
        step = 1 if isinstance(paging, PagePaging) else len(page.items)
        return with_params(url, {paging.param: str(position + step)})
    return links.get("next")
