"""Alert rule expressions: parsed once at config load, evaluated on a sliding history of readings.

Grammar (whitespace free between tokens):

    rule      := value [ CMP NUMBER ]           CMP: > >= < <= == !=
    value     := selector                        the current value (a counter's total since start)
               | rate(selector, DURATION)        per-second increase over the window (counters)
               | increase(selector, DURATION)    increase over the window (counters)
               | ratio(selector, selector, DURATION)   increase of the first / of the second
               | p50|p90|p95|p99(selector, DURATION)   a quantile of a histogram over the window
               | quantile(Q, selector, DURATION)
               | avg(selector, DURATION)         mean of a histogram's observations in the window
    selector  := NAME [ { LABEL = "v" , LABEL != "v" ... } ]

A NAME is an instrument of `daemon.telemetry.metrics` (`ferry.queue.depth`); the `ferry.` prefix may be
left out and `_` may stand for `.` (`queue_depth`, `ferry_dead_letters`). A selector sums every
series whose attributes match; a counter with no series yet reads 0 (counters start at 0), a
gauge or a histogram with none reads as no data.

Windows and resets:
    Each evaluation appends one reading per selector (time, value) to its history, which keeps
    the window plus one reading before it. Increases add up consecutive differences; a drop is a
    counter reset (a restarted daemon) and counts from zero, as in Prometheus. A window function
    needs two readings; before that (just started, or just restarted) it has no data.
    Quantiles interpolate linearly inside the bucket, as Prometheus' `histogram_quantile`.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from daemon.config.units import Duration

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricsData

__all__ = ["Expr", "ExprError", "HistPoint", "Reading", "Snapshot", "Tracker", "flatten", "parse_expr"]

COUNTERS: Final = frozenset({"counter", "observable_counter"})
HISTOGRAMS: Final = frozenset({"histogram"})
_COMPARE: Final[dict[str, Callable[[float, float], bool]]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
_QUANTILES: Final = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
_WINDOWED: Final = frozenset({"rate", "increase", "ratio", "quantile", "avg", *_QUANTILES})
_MAX_READINGS: Final = 100_000
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<op>>=|<=|==|!=|=|>|<)
      | (?P<punct>[(){},])
      | (?P<duration>\d+(?:\.\d+)?(?:ms|s|m|h|d)\b)
      | (?P<number>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)
      | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
    )""",
    re.VERBOSE,
)


class ExprError(ValueError):
    """An expression that cannot be parsed or does not fit its metric (the message says where)."""


@dataclass(frozen=True)
class HistPoint:
    """A cumulative histogram: bucket upper bounds (without +Inf), counts per bucket, count and sum."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    sum: float


EMPTY_HIST: Final = HistPoint((), (), 0, 0.0)
Reading = float | HistPoint
Attributes = Mapping[str, Any]
Snapshot = Mapping[str, list[tuple[Attributes, Reading]]]
"""Every series of every metric: name -> [(attributes, value)]."""


def flatten(data: MetricsData | None) -> dict[str, list[tuple[Attributes, Reading]]]:
    """The SDK's collected metrics as a `Snapshot` (cumulative sums, last gauge values)."""
    # imported here: the config (and so `ferry ctl`) parses expressions without loading the SDK
    from opentelemetry.sdk.metrics.export import Gauge, Histogram, Sum

    snapshot: dict[str, list[tuple[Attributes, Reading]]] = {}
    if data is None:
        return snapshot
    for resource_metrics in data.resource_metrics:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                series = snapshot.setdefault(metric.name, [])
                if isinstance(metric.data, Histogram):
                    for hist in metric.data.data_points:
                        point = HistPoint(
                            tuple(hist.explicit_bounds), tuple(hist.bucket_counts), hist.count, hist.sum
                        )
                        series.append((dict(hist.attributes or {}), point))
                elif isinstance(metric.data, Sum | Gauge):
                    for number in metric.data.data_points:
                        series.append((dict(number.attributes or {}), float(number.value)))
    return snapshot


def _canonical(name: str) -> str:
    name = name.replace("_", ".")
    return name if name.startswith("ferry.") else f"ferry.{name}"


@dataclass(frozen=True)
class Selector:
    """A metric name and label matchers; `read` sums the matching series of a snapshot."""

    name: str  # as the instrument is called
    kind: str  # the instrument's kind (`counter`, `histogram`, `observable_gauge`, ...)
    matchers: tuple[tuple[str, str, str], ...] = ()  # (label, "=" or "!=", value)
    text: str = ""

    def _matches(self, attributes: Attributes) -> bool:
        for label, op, value in self.matchers:
            present = label in attributes and str(attributes[label]) == value
            if present != (op == "="):
                return False
        return True

    def read(self, snapshot: Snapshot) -> Reading | None:
        """The sum of the matching series now, or None (no data)."""
        matched = [value for attributes, value in snapshot.get(self.name, ()) if self._matches(attributes)]
        if self.kind in HISTOGRAMS:
            hists = [value for value in matched if isinstance(value, HistPoint)]
            return _add_hists(hists) if hists else None
        numbers = [value for value in matched if not isinstance(value, HistPoint)]
        if not numbers:
            return 0.0 if self.kind in COUNTERS else None
        return float(sum(numbers))


def _add_hists(hists: list[HistPoint]) -> HistPoint:
    first = hists[0]
    same = [h for h in hists if h.bounds == first.bounds]
    counts = tuple(sum(column) for column in zip(*(h.counts for h in same), strict=True))
    return HistPoint(first.bounds, counts, sum(h.count for h in same), sum(h.sum for h in same))


@dataclass(frozen=True)
class Expr:
    """A parsed rule expression; `value()` computes it from readings, `holds()` applies the comparison."""

    text: str
    func: str  # "value" | "rate" | "increase" | "ratio" | "quantile" | "avg"
    selectors: tuple[Selector, ...]
    window: float = 0.0
    q: float = 0.0
    op: str | None = None
    threshold: float | None = None

    @property
    def value_text(self) -> str:
        """The expression without its comparison."""
        if self.op is None:
            return self.text
        return self.text.rsplit(self.op, 1)[0].strip()

    def holds(self, value: float) -> bool:
        """Whether the comparison is true for `value` (an expression without one never holds)."""
        if self.op is None or self.threshold is None:
            return False
        return _COMPARE[self.op](value, self.threshold)

    def value(self, histories: list[deque[tuple[float, Reading]]]) -> float | None:
        """The expression's value from each selector's readings (oldest first), or None (no data)."""
        if any(not history for history in histories):
            return None
        if self.func == "value":
            latest = histories[0][-1][1]
            return None if isinstance(latest, HistPoint) else latest
        if any(len(history) < 2 for history in histories):
            return None
        if self.func in ("rate", "increase"):
            increase = _increase([value for _, value in histories[0]])
            if self.func == "increase":
                return increase
            span = histories[0][-1][0] - histories[0][0][0]
            return increase / span if span > 0 else None
        if self.func == "ratio":
            top = _increase([value for _, value in histories[0]])
            bottom = _increase([value for _, value in histories[1]])
            if bottom == 0:
                return 0.0 if top == 0 else None
            return top / bottom
        delta = _hist_delta(histories[0][0][1], histories[0][-1][1])
        if delta is None or delta.count == 0:
            return None
        if self.func == "avg":
            return delta.sum / delta.count
        return _quantile(self.q, delta)


def _increase(values: list[Reading]) -> float:
    numbers = [value for value in values if not isinstance(value, HistPoint)]
    total = 0.0
    for before, after in itertools.pairwise(numbers):
        total += after - before if after >= before else after
    return total


def _hist_delta(first: Reading, last: Reading) -> HistPoint | None:
    if not isinstance(first, HistPoint) or not isinstance(last, HistPoint):
        return None
    if first.count == 0 or first.bounds != last.bounds or last.count < first.count:
        return last  # nothing before, or a reset: everything since counts
    counts = tuple(b - a for a, b in zip(first.counts, last.counts, strict=True))
    return HistPoint(last.bounds, counts, last.count - first.count, last.sum - first.sum)


def _quantile(q: float, hist: HistPoint) -> float:
    """Prometheus' histogram_quantile: linear inside the bucket; the +Inf bucket gives its lower bound."""
    rank = q * hist.count
    seen = 0
    for index, count in enumerate(hist.counts):
        if count and seen + count >= rank:
            if index >= len(hist.bounds):
                return hist.bounds[-1] if hist.bounds else math.inf
            lower = hist.bounds[index - 1] if index else 0.0
            upper = hist.bounds[index]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return hist.bounds[-1] if hist.bounds else math.inf


@dataclass
class Tracker:
    """One rule's readings over its window; `observe` adds a snapshot and returns the value."""

    expr: Expr
    histories: list[deque[tuple[float, Reading]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.histories = [deque(maxlen=_MAX_READINGS) for _ in self.expr.selectors]

    def observe(self, snapshot: Snapshot, now: float) -> float | None:
        for selector, history in zip(self.expr.selectors, self.histories, strict=True):
            reading = selector.read(snapshot)
            if reading is None:
                history.clear()  # a gap: a window must not span it
                continue
            history.append((now, reading))
            # keep one reading at or before the window's start, so the increase covers all of it
            while len(history) >= 2 and history[1][0] <= now - self.expr.window:
                history.popleft()
        return self.expr.value(self.histories)


# -- parsing -----------------------------------------------------------------------------------


class _Tokens:
    def __init__(self, text: str) -> None:
        self.text = text
        self.items: list[tuple[str, str, int]] = []
        position = 0
        stripped = text.rstrip()
        while position < len(stripped):
            match = _TOKEN.match(stripped, position)
            if match is None or match.lastgroup is None:
                raise ExprError(f"unexpected {stripped[position:].strip()[:20]!r} at column {position + 1}")
            self.items.append((match.lastgroup, match.group(match.lastgroup), match.start(match.lastgroup)))
            position = match.end()
        self.index = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.items[self.index] if self.index < len(self.items) else None

    def take(self, kind: str, value: str | None = None) -> str:
        token = self.peek()
        if token is None:
            raise ExprError(f"expected {value or kind} at the end")
        if token[0] != kind or (value is not None and token[1] != value):
            raise ExprError(f"expected {value or kind}, got {token[1]!r} at column {token[2] + 1}")
        self.index += 1
        return token[1]


def parse_expr(text: str, known: Mapping[str, str], *, comparison: bool | None = None) -> Expr:
    """Parse `text` against the metric catalogue `known` (name -> instrument kind).

    `comparison`: True requires `value CMP NUMBER` (a threshold rule), False forbids it (an
    anomaly rule), None allows either. Raises `ExprError` saying what is wrong.
    """
    tokens = _Tokens(text)
    if not tokens.items:
        raise ExprError("empty expression")
    by_canonical = {_canonical(name): name for name in known}
    func, selectors, window, q = _value(tokens, known, by_canonical)
    op = threshold = None
    token = tokens.peek()
    if token is not None and token[0] == "op" and token[1] in _COMPARE:
        tokens.index += 1
        op = token[1]
        threshold = float(tokens.take("number"))
    if tokens.peek() is not None:
        extra = tokens.peek()
        assert extra is not None
        raise ExprError(f"unexpected {extra[1]!r} at column {extra[2] + 1}")
    if comparison is True and op is None:
        raise ExprError("a threshold rule needs a comparison, e.g. `... > 100`")
    if comparison is False and op is not None:
        raise ExprError("an anomaly rule takes a value without a comparison (the z-score decides)")
    return Expr(text.strip(), func, selectors, window, q, op, threshold)


def _value(
    tokens: _Tokens, known: Mapping[str, str], by_canonical: Mapping[str, str]
) -> tuple[str, tuple[Selector, ...], float, float]:
    head = tokens.peek()
    assert head is not None
    following = tokens.items[tokens.index + 1] if tokens.index + 1 < len(tokens.items) else None
    if head[0] != "name" or following is None or following[1] != "(":
        selector = _selector(tokens, known, by_canonical)
        if selector.kind in HISTOGRAMS:
            raise ExprError(f"{selector.name} is a histogram: use p99({selector.text}, 5m) or avg(...)")
        return "value", (selector,), 0.0, 0.0
    func = tokens.take("name")
    if func not in _WINDOWED:
        raise ExprError(f"unknown function {func!r} (rate, increase, ratio, p50/p90/p95/p99, quantile, avg)")
    tokens.take("punct", "(")
    q = _QUANTILES.get(func, 0.0)
    if func == "quantile":
        q = float(tokens.take("number"))
        if not 0 <= q <= 1:
            raise ExprError(f"quantile {q:g} is not between 0 and 1")
        tokens.take("punct", ",")
    selectors = [_selector(tokens, known, by_canonical)]
    if func == "ratio":
        tokens.take("punct", ",")
        selectors.append(_selector(tokens, known, by_canonical))
    tokens.take("punct", ",")
    window = _window(tokens)
    tokens.take("punct", ")")
    wants = HISTOGRAMS if func in ("quantile", "avg", *_QUANTILES) else COUNTERS
    for selector in selectors:
        if selector.kind not in wants:
            what = "a histogram" if wants is HISTOGRAMS else "a counter"
            raise ExprError(f"{func}() needs {what}; {selector.name} is {selector.kind.replace('_', ' ')}")
    name = "quantile" if func in _QUANTILES else func
    return name, tuple(selectors), window, q


def _window(tokens: _Tokens) -> float:
    token = tokens.peek()
    if token is None or token[0] not in ("duration", "number"):
        raise ExprError("expected a window duration such as 5m")
    tokens.index += 1
    if token[0] == "number":
        raise ExprError(f"window {token[1]!r} needs a unit: ms, s, m, h or d (e.g. 5m)")
    window = float(Duration.parse(token[1]))
    if window <= 0:
        raise ExprError("a window must be longer than 0s")
    return window


def _selector(tokens: _Tokens, known: Mapping[str, str], by_canonical: Mapping[str, str]) -> Selector:
    start = tokens.peek()
    written = tokens.take("name")
    name = written if written in known else by_canonical.get(_canonical(written))
    if name is None:
        raise ExprError(f"unknown metric {written!r}; known: {', '.join(sorted(known))}")
    matchers: list[tuple[str, str, str]] = []
    token = tokens.peek()
    if token is not None and token[1] == "{":
        tokens.index += 1
        while True:
            token = tokens.peek()
            if token is not None and token[1] == "}":
                tokens.index += 1
                break
            label = tokens.take("name")
            op = tokens.take("op")
            if op not in ("=", "!="):
                raise ExprError(f"label matcher {label}{op}: use = or !=")
            value = tokens.take("string")
            matchers.append((label, op, _unquote(value)))
            after = tokens.peek()
            if after is not None and after[1] == ",":
                tokens.index += 1
    assert start is not None
    end = tokens.items[tokens.index - 1]
    text = tokens.text[start[2] : end[2] + len(end[1])]
    return Selector(name, known[name], tuple(matchers), text)


def _unquote(literal: str) -> str:
    return re.sub(r"\\(.)", r"\1", literal[1:-1])
