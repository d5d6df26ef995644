"""Issue 13's "Done when": random JSON through the whole pipeline of one real daemon process
(listener → transform → HTTP sink, `[telemetry] mask` on) never stops it, and every acked
event ends delivered or dead."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.depth import examples
from tests.fakes import HTTP, Daemon, FakeReceiver, Received, Reply, ctl_json, write_config

PIPELINE = """
[telemetry]
traces = false
metrics = false
mask = ["email", "$.card.number"]

[control]
socket = "{socket}"

[sources.in]
type = "webhook"

[transforms.shape]
inputs = ["in"]
map = '''
if type == "object" and (.__deepen | type) == "number"
then reduce range([.__deepen, 3000] | min) as $i (.leaf; {{email: "x@y.z", d: [.]}})
else . end'''

[sinks.out]
type = "http"
inputs = ["shape"]
url = "{url}/x"
retry = {{ max_attempts = 2, initial_backoff = "20ms", max_backoff = "50ms" }}
"""

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(["email", "\u0000", "\ud7ff\ue000", "NaN", "Infinity", "-0", "1e999"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=30,
)


def nested(depth: int, leaf: Any) -> str:
    """JSON text `depth` levels deep (built as text: Python's own `json` cannot nest that far)."""
    opens = "".join("[" if index % 2 else '{"email":"x@y.z","d":' for index in range(depth))
    closes = "".join("]" if index % 2 else "}" for index in reversed(range(depth)))
    return opens + json.dumps(leaf, allow_nan=False) + closes


bodies = st.one_of(
    values.map(lambda value: json.dumps(value, allow_nan=False)),
    # Deep at the door: up to 900 levels (deeper bodies are the listener's `max_depth` to refuse).
    st.builds(nested, st.integers(min_value=1, max_value=900), values),
    st.integers(min_value=0, max_value=20_000).map(lambda n: json.dumps(list(range(n)))),
    st.integers(min_value=1, max_value=400).map(lambda n: "9" * n),  # integers past any machine type
    # Small at the door, deep after the transform: reaches the transform's encoder and the sink's
    # masking whatever depth limit the listener applies.
    st.builds(
        lambda depth, leaf: json.dumps({"__deepen": depth, "leaf": leaf}, allow_nan=False),
        st.integers(min_value=1, max_value=3000),
        values,
    ),
)


def echo(request: Received) -> Reply:
    return 200, {}, request.body[:1000]


def test_random_json_never_stops_the_pipeline(tmp_path: Path, sock_dir: Path) -> None:
    receiver = FakeReceiver(echo).start()
    config = write_config(tmp_path, PIPELINE.format(socket=sock_dir / "ctl.sock", url=receiver.url))
    daemon = Daemon(config, tmp_path / "log.jsonl").start()
    acked: list[str] = []
    try:

        @settings(
            max_examples=examples(40),
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(bodies)
        def post(text: str) -> None:
            answer = HTTP.post(
                f"{daemon.url}/hooks/in",
                content=text.encode("utf-8", "surrogatepass"),
                headers={"content-type": "application/json"},
                timeout=10,
            )
            assert answer.status_code in (202, 400, 413), answer.text
            if answer.status_code == 202:
                acked.append(answer.json()["id"])

        post()
        # A plain event after all of them still goes through.
        last = httpx.post(f"{daemon.url}/hooks/in", json={"last": True}, timeout=10)
        assert last.status_code == 202
        acked.append(last.json()["id"])
        deadline = time.monotonic() + 30
        while not any(b'"last"' in request.body for request in list(receiver.requests)):
            assert time.monotonic() < deadline, "the pipeline stopped delivering"
            time.sleep(0.05)
        # Every acked event ends delivered or dead: the transform gives one output per event, so
        # each is a dead letter of `shape` or a delivery of `out` that is no longer pending.
        deadline = time.monotonic() + 30
        while True:
            stages = ctl_json(config, "status")["stages"]
            finished = stages["out"]["delivered"] + stages["out"]["dead"] + stages["shape"]["dead"]
            if stages["out"]["pending"] == 0 and finished == len(acked):
                break
            assert time.monotonic() < deadline, (len(acked), stages)
            time.sleep(0.1)
        assert daemon.proc is not None
        assert daemon.proc.poll() is None
        actors = ctl_json(config, "status")["actors"]
        assert all(actor["restarts"] == 0 for actor in actors), actors
    finally:
        daemon.stop()
        receiver.stop()
