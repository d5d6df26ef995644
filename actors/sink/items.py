"""Per-item outcomes of a batch: which items a 2xx answer says were refused, and why (pure).

A batching HTTP sink with `batch.item_outcomes` runs `ItemOutcomes.read(body, payloads)` on
every 2xx answer. It returns the refused items by position in the batch, each as the delivery
error a single request with that item's status would have raised: 408, 425, 429 and 5xx are
`RetryableDelivery`, every other non-2xx status `PermanentDelivery`. Items it does not name were
delivered.

Entries (the `failed` program's outputs, one JSON object each):
    `index` (0-based position in the batch) or `key` (equal to exactly one item's `item_key`
    value); `status` (a number or numeric string; absent or null: retried, as an unknown
    cause; 2xx: not refused after all); `reason` (text; absent: "refused by the receiver").
    Several entries for one item are allowed (HubSpot lists each problem apart): the item takes
    the most severe (permanent over retryable) and every reason, joined with "; ".

Errors:
    `UnreadableAnswer` (a `ValueError`) when the answer cannot be attributed item by item: a
    body that is not JSON (an empty one reads as null), a program that fails, an entry that is
    not an object or names no item, an index outside the batch, a key no item or several items
    have. The caller then treats the whole batch as one retryable failure, so nothing the
    receiver may have refused is counted as delivered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, final

import jq
import msgspec

from actors.sink.items_config import PRESET_MEMBERS, ItemOutcomesConfig
from daemon.errors import DeliveryError, PermanentDelivery, RetryableDelivery
from daemon.telemetry import masking

RETRYABLE_STATUSES: Final = frozenset({408, 425, 429})
DEFAULT_REASON: Final = "refused by the receiver"
MAX_REASON: Final = 500


class UnreadableAnswer(ValueError):
    """The answer's per-item outcomes cannot be read; the message says why."""


def item_error(status: int | None, reason: str) -> DeliveryError:
    """The delivery error of one refused item, classified by its own status like a single request."""
    message = f"item refused (HTTP {status}): {reason}" if status is not None else f"item refused: {reason}"
    if status is None or status in RETRYABLE_STATUSES or status >= 500:
        return RetryableDelivery(message, status=status)
    return PermanentDelivery(message, status=status)


@final
class ItemOutcomes:
    """The compiled programs of one sink's `item_outcomes`; see the module docstring.

    Raises `ValueError` on a program that does not compile (`ferry check` reports it first).
    """

    def __init__(self, config: ItemOutcomesConfig) -> None:
        failed, key = config.programs()
        self._failed = jq.compile(failed)
        self._key = jq.compile(key) if key is not None else None
        self.source = config.preset or "failed"
        # A preset reads only these top-level members: the rest (HubSpot echoes every record it
        # wrote) is not handed to jq, whose JSON parser costs ~10x msgspec's.
        self._members = PRESET_MEMBERS[config.preset] if config.preset is not None else None

    def __repr__(self) -> str:
        return f"<ItemOutcomes {self.source}>"

    def read(self, body: bytes, payloads: Sequence[bytes]) -> dict[int, DeliveryError]:
        """The refused items of a batch of `payloads`, by position, from a 2xx answer's `body`."""
        text = body.decode("utf-8", "replace") if body.strip() else "null"
        try:
            document = msgspec.json.decode(text)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise UnreadableAnswer(f"the answer is not JSON ({exc})") from None
        if self._members is not None and isinstance(document, dict):
            flag = document.get("errors")
            # Nothing refused: Elasticsearch says so in its own flag; the others list no error.
            quiet = (flag is False) if self.source == "elasticsearch" else (flag is None or flag == [])
            if quiet:
                return {}
            kept = {name: document[name] for name in self._members if name in document}
            text = msgspec.json.encode(kept).decode()
        try:
            entries = self._failed.input_text(text).all()
        except ValueError as exc:
            why = " ".join(str(exc).split())
            raise UnreadableAnswer(f"the item_outcomes program failed: {why}") from None
        found: dict[int, list[tuple[int | None, str]]] = {}
        keys: dict[Any, list[int]] | None = None
        for entry in entries:
            if not isinstance(entry, dict):
                raise UnreadableAnswer(f"an entry is not an object: {_short(entry)}")
            status = _status(entry)
            if status is not None and 200 <= status < 300:
                continue
            if entry.get("index") is not None:
                index = entry["index"]
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(payloads):
                    raise UnreadableAnswer(
                        f"item index {_short(index)} is outside the batch of {len(payloads)}"
                    )
            elif entry.get("key") is not None:
                if keys is None:
                    keys = self._keys(payloads)
                matches = keys.get(_hashable(entry["key"]), [])
                if len(matches) != 1:
                    what = "no item" if not matches else f"{len(matches)} items"
                    raise UnreadableAnswer(f"item key {_short(entry['key'])} matches {what} of the batch")
                index = matches[0]
            else:
                raise UnreadableAnswer(f"an entry names no item (no index, no key): {_short(entry)}")
            reason = entry.get("reason")
            text = reason if isinstance(reason, str) and reason else DEFAULT_REASON
            found.setdefault(index, []).append((status, text[:MAX_REASON]))
        return {index: _combined(outcomes) for index, outcomes in found.items()}

    def _keys(self, payloads: Sequence[bytes]) -> dict[Any, list[int]]:
        """Each item key value and the positions holding it (an item whose key fails has none)."""
        if self._key is None:
            raise UnreadableAnswer("an entry names an item by key, but no item_key program is set")
        keys: dict[Any, list[int]] = {}
        for index, payload in enumerate(payloads):
            try:
                values = self._key.input_text(payload.decode()).all()
            except (ValueError, UnicodeDecodeError):
                continue
            if len(values) == 1 and values[0] is not None:
                keys.setdefault(_hashable(values[0]), []).append(index)
        return keys


def scrubbed_items(
    items: Mapping[int, DeliveryError], payloads: Sequence[bytes], redactor: masking.Redactor
) -> Mapping[int, DeliveryError]:
    """`items` with the batch's masked values and every secret hidden in their messages (which
    become dead letters' `last_error` and log fields), the payloads decoded once for them all."""
    if not (redactor.rules or redactor.secrets):
        return items
    decoded = [masking.decode_payload(payload) for payload in payloads] if redactor.rules else None
    scrubbed: dict[int, DeliveryError] = {}
    for index, error in items.items():
        message = str(error)
        text = redactor.scrub(message, decoded) or message
        kind = type(error)
        scrubbed[index] = error if text == message else kind(text, status=error.status, retry_after=None)
    return scrubbed


def _status(entry: Mapping[str, Any]) -> int | None:
    value = entry.get("status")
    if isinstance(value, bool):
        raise UnreadableAnswer(f"status {value!r} is not a number")
    if isinstance(value, int | float) or (isinstance(value, str) and value.strip().isdigit()):
        status = int(value)
        if not 100 <= status <= 599:
            raise UnreadableAnswer(f"status {_short(value)} is not an HTTP status")
        return status
    if value is None:
        return None
    raise UnreadableAnswer(f"status {_short(value)} is not a number")


def _combined(outcomes: list[tuple[int | None, str]]) -> DeliveryError:
    """One error for an item named by several entries: the most severe, with every reason."""
    errors = [item_error(status, reason) for status, reason in outcomes]
    if len(errors) == 1:
        return errors[0]
    worst = next((error for error in errors if isinstance(error, PermanentDelivery)), errors[0])
    reasons = "; ".join(dict.fromkeys(reason for _, reason in outcomes))
    return item_error(worst.status, reasons[:MAX_REASON])


def _hashable(value: Any) -> Any:
    """A key as a dict key: scalars as themselves (1 and "1" differ), anything else as its JSON."""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return value
    return msgspec.json.encode(value).decode()


def _short(value: Any) -> str:
    text = msgspec.json.encode(value).decode() if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
