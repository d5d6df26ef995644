"""ferry against the peers a user would otherwise run, in one run on one machine.

    .venv/bin/python -m bench.peers [--quick]      # also case 9 of `make bench`

The peers, each installed by this script from the package registries into a scratch folder
(`FERRY_BENCH_PEERS_DIR` keeps and reuses it), started as their own processes on 127.0.0.1 and
stopped afterwards:

- **Node-RED** (npm `node-red` 4): the flow `http in → http response (202)` plus `http in →
  http request` to the receiver. Not durable: an event is answered before it is stored
  anywhere, and one in flight when Node-RED stops is gone.
- **Huey relay** (pip `huey`, `uvicorn`, `httpx` in a scratch venv): the relay a Python user would
  write, a small ASGI app that enqueues each event as a task on `SqliteHuey` (SQLite, WAL) and
  answers 202 once enqueued, and `huey_consumer` (4 worker threads) POSTing each to the receiver
  with retries.
- **ferry**, twice: `durability = "full"`, the jq transform and a per-event http sink
  (concurrency 16), as every peer delivers per event; and the same with a batching sink
  (`max_items = 500`, `max_wait = "20ms"`, concurrency 8), the configuration issue #2 calls
  "durable ingest" and the one docs/performance.md recommends for throughput.
- **the design's floor** (`bench/skeleton.py`): DESIGN.md's per-event pipeline as bare trio tasks
  on ferry's store, jq and client, with nothing of ferry's own around it (no config, metrics,
  logs, guard...), under the same end-to-end load: the most any daemon that keeps ferry's
  contract with these parts could do per event on this machine, and so the ceiling of the
  end-to-end target (issue 16, docs/performance.md "Session 7"). Only its end-to-end ratio is
  printed; it is not judged.

Each gets the same loads, with the same receiver (`bench.receiver`) and the same wrk script:

- ingest: `wrk -t2 -c50` for the case's duration against the webhook, req/s and latency p50/p99
  (everything it acknowledges is delivered too, concurrently);
- end to end: EVENTS POSTs, then the time until the receiver has every acknowledged one:
  delivered events/s from the first POST to the last delivery;
- RSS: the peak resident set (VmHWM) of the peer's processes.

Targets (issue #8): ferry's durable ingest ≥ 4x Node-RED's and ≥ 8x the Huey relay's; its end-
to-end rate ≥ 2x Node-RED's (issue 16; #8 asked for 1x). Every ratio is printed for both of
ferry's configurations; the ingest targets are judged on the batching one (#2's "durable
ingest"), the end-to-end target on the per-event one (like for like: the peers deliver per
event). Beside them, for scale: the bare trio + h11 server that answers 202 and does nothing,
against each peer (`bench.listener_bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from bench.context import Context, bench_context, report
from bench.harness import Ferry, Skeleton, peak_rss_mib, post_count, write_config, wrk_missing, wrk_script
from bench.listener_bench import PATH, serve_bare
from bench.listener_bench import measure as measure_bare
from bench.receiver import Receiver
from bench.report import Row
from tests.fakes import free_port

NODE_RED_VERSION = "4"
INSTALL_LIMIT_S = 600

HUEY_APP = '''
"""A webhook relay on Huey's SQLite queue: ASGI in, one task per event, delivered with retries."""

import os

import httpx
from huey import SqliteHuey

huey = SqliteHuey(filename=os.environ["RELAY_DB"])
RECEIVER = os.environ["RELAY_TARGET"]
client = httpx.Client(timeout=10)


@huey.task(retries=8, retry_delay=1)
def deliver(body: bytes) -> None:
    client.post(RECEIVER, content=body, headers={"content-type": "application/json"}).raise_for_status()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["method"] != "POST":
        status, answer = 405, b'{"error": "method not allowed"}'
    else:
        deliver(body)  # one INSERT + COMMIT in Huey's SQLite queue
        status, answer = 202, b'{"queued": true}'
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": answer})
'''


def node_red_flow(receiver_url: str) -> list[dict[str, object]]:
    return [
        {"id": "tab", "type": "tab", "label": "relay"},
        {
            "id": "in",
            "type": "http in",
            "z": "tab",
            "url": PATH,
            "method": "post",
            "upload": False,
            "wires": [["answer", "forward"]],
        },
        {
            "id": "answer",
            "type": "http response",
            "z": "tab",
            "statusCode": "202",
            "headers": {},
            "wires": [],
        },
        {
            "id": "forward",
            "type": "http request",
            "z": "tab",
            "method": "POST",
            "ret": "txt",
            "url": receiver_url,
            "paytoqs": "ignore",
            "wires": [[]],
        },
    ]


NODE_RED_SETTINGS = """
module.exports = {
    uiPort: Number(process.env.PORT),
    uiHost: "127.0.0.1",
    httpAdminRoot: false,
    flowFile: "flows.json",
    logging: { console: { level: "warn", metrics: false, audit: false } },
    editorTheme: { tours: false },
    telemetry: { enabled: false },
};
"""


@dataclass
class Peer:
    """One system under test: its processes, its URL and how to read its acknowledged count."""

    name: str
    url: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def peak_rss_mib(self) -> float | None:
        total = 0.0
        for proc in self.procs:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                return None
            total += (
                next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
            )
        return total

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def scratch() -> tuple[Path, bool]:
    """The scratch folder for the peers' installs, and whether to keep it afterwards."""
    kept = os.environ.get("FERRY_BENCH_PEERS_DIR")
    if kept:
        path = Path(kept)
        path.mkdir(parents=True, exist_ok=True)
        return path, True
    return Path(tempfile.mkdtemp(prefix="ferry-peers-")), False


def install_node_red(folder: Path) -> Path:
    """`node-red` from npm into `folder`; the path of its `red.js`. Raises RuntimeError if it cannot."""
    red = folder / "node_modules" / "node-red" / "red.js"
    if red.exists():
        return red
    if shutil.which("npm") is None:
        raise RuntimeError("npm is not installed (apt-get install -y npm)")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", f"node-red@{NODE_RED_VERSION}"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=INSTALL_LIMIT_S,
        check=False,
    )
    if done.returncode != 0 or not red.exists():
        raise RuntimeError(f"npm install node-red failed: {done.stderr[-500:]}")
    return red


def install_huey(folder: Path) -> Path:
    """A venv in `folder` with huey, uvicorn and httpx from PyPI; its `bin` folder."""
    bin_ = folder / "venv" / "bin"
    if (bin_ / "huey_consumer").exists() and (bin_ / "uvicorn").exists():
        return bin_
    subprocess.run([sys.executable, "-m", "venv", str(folder / "venv")], check=True, timeout=120)
    done = subprocess.run(
        [str(bin_ / "pip"), "install", "--quiet", "huey>=2.5", "uvicorn>=0.30", "httpx>=0.27"],
        capture_output=True,
        text=True,
        timeout=INSTALL_LIMIT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip install huey uvicorn httpx failed: {done.stderr[-500:]}")
    return bin_


async def wait_answering(url: str, limit_s: float = 60) -> None:
    """Until a POST of one event gets any 2xx (the peer is up)."""
    async with httpx.AsyncClient(timeout=2) as client:
        with trio.fail_after(limit_s):
            while True:
                try:
                    response = await client.post(url + PATH, json={"warmup": True})
                    if response.is_success:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.1)


def spawn_node_red(folder: Path, receiver_url: str) -> Peer:
    red = install_node_red(folder / "node-red")
    user = folder / "node-red-user"
    shutil.rmtree(user, ignore_errors=True)
    user.mkdir(parents=True)
    (user / "flows.json").write_text(json.dumps(node_red_flow(receiver_url + "/")))
    (user / "settings.js").write_text(NODE_RED_SETTINGS)
    port = free_port()
    proc = subprocess.Popen(
        ["node", str(red), "--userDir", str(user), "--settings", str(user / "settings.js")],
        cwd=user,
        env={**os.environ, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=(user / "node-red.log").open("wb"),
    )
    return Peer("Node-RED", f"http://127.0.0.1:{port}", [proc])


def spawn_huey(folder: Path, receiver_url: str) -> Peer:
    bin_ = install_huey(folder / "huey")
    work = folder / "huey-run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "relay.py").write_text(HUEY_APP)
    env = {
        **os.environ,
        "RELAY_DB": str(work / "queue.db"),
        "RELAY_TARGET": receiver_url + "/",
        "PYTHONPATH": str(work),
    }
    port = free_port()
    log = (work / "relay.log").open("wb")
    web = subprocess.Popen(
        [str(bin_ / "uvicorn"), "relay:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    consumer = subprocess.Popen(
        [str(bin_ / "huey_consumer"), "relay.huey", "-w", "4", "-k", "thread", "-q"],
        cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    return Peer("Huey relay", f"http://127.0.0.1:{port}", [web, consumer])


async def start(spawn: Callable[[Path, str], Peer], folder: Path, receiver_url: str) -> Peer:
    """Install (if needed) and spawn a peer, then wait until it answers."""
    peer = await trio.to_thread.run_sync(spawn, folder, receiver_url)
    try:
        await wait_answering(peer.url)
    except BaseException:
        peer.stop()
        raise
    return peer


@dataclass
class Figures:
    ingest_rps: float
    p50_ms: float | None
    p99_ms: float | None
    ingest_errors: int
    e2e_rps: float
    e2e_acked: int
    e2e_delivered: int
    rss_mib: float | None


async def settle(receiver: Receiver, expected: int, limit_s: float = 300) -> None:
    """Until the receiver has `expected` items and then nothing more for 1.5 s (requests cut off at
    the end of a wrk run may still be on their way), or nothing at all for 5 s (a peer may lose some)."""
    with trio.move_on_after(limit_s):
        seen, since = -1, time.monotonic()
        while True:
            items = (await receiver.stats())["items"]
            if items != seen:
                seen, since = items, time.monotonic()
            quiet = time.monotonic() - since
            if quiet > 5.0 or (items >= expected and quiet > 1.5):
                return
            await trio.sleep(0.1)


def _latency_ms(output: str, percentile: str) -> float | None:
    found = re.search(rf"^\s+{percentile}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    if found is None:
        return None
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]
    return float(found.group(1)) * scale


async def measure(
    url: str, ctx: Context, folder: Path, events: int, rss: Callable[[], float | None]
) -> Figures:
    script = wrk_script(folder)
    await ctx.receiver.reset()
    command = ["wrk", "-t2", "-c50", f"-d{ctx.duration}s", "--latency", "-s", str(script), url + PATH]
    with trio.fail_after(ctx.duration + 60):
        result = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
    output = result.stdout.decode()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    # What the ingest load acknowledged must be delivered before the end-to-end count starts.
    ingested = int(re.search(r"(\d+) requests in", output).group(1)) - errors  # type: ignore[union-attr]
    await settle(ctx.receiver, ingested)
    await ctx.receiver.reset()
    started = time.time()
    wrk = await post_count(url, folder, events, limit_s=120)
    acked = wrk.requests - wrk.non_2xx
    stats = await ctx.receiver.wait_items(acked, 120)
    last = stats["last"] or time.time()
    return Figures(
        rps,
        _latency_ms(output, "50"),
        _latency_ms(output, "99"),
        errors,
        min(stats["items"], acked) / max(last - started, 1e-3),
        acked,
        stats["items"],
        rss(),
    )


async def peers(ctx: Context) -> None:
    """Case 7: the peer table (see the module docstring); rows go into `ctx.rows`."""
    events = 1_000 if ctx.quick else 5_000
    folder, keep = scratch()
    try:
        await _measure_all(ctx, folder, events)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


async def _measure_all(ctx: Context, folder: Path, events: int) -> None:
    results: dict[str, Figures] = {}
    for name, batch, concurrency, path in ((PER_EVENT, False, 16, "/"), (BATCHING, True, 8, "/batch")):
        ferry_folder = ctx.tmp / ("peers-batching" if batch else "peers-per-event")
        config = write_config(ferry_folder, ctx.receiver.url + path, batch=batch, concurrency=concurrency)
        ferry = Ferry.start(ferry_folder, config, ctx.running)
        try:
            results[name] = await measure(ferry.url, ctx, ferry_folder, events, ferry.peak_rss_mib)
        finally:
            ferry.stop()
    floor_folder = ctx.tmp / "peers-floor"
    skeleton = Skeleton(floor_folder, ctx.receiver.url + "/")
    try:
        results[FLOOR] = await measure(
            skeleton.url, ctx, floor_folder, events, lambda: peak_rss_mib(skeleton.pid)
        )
    finally:
        skeleton.stop()
    wrk_args = argparse.Namespace(threads=2, connections=50, duration=ctx.duration)
    bare = await measure_bare(serve_bare, wrk_script(ctx.tmp), wrk_args)
    for name, spawn in (("Node-RED", spawn_node_red), ("Huey relay", spawn_huey)):
        try:
            peer = await start(spawn, folder, ctx.receiver.url)
        except (RuntimeError, OSError, subprocess.SubprocessError, trio.TooSlowError) as exc:
            ctx.anomalies.append(f"peer {name} could not be installed or started: {exc}")
            continue
        try:
            work = folder / f"{name.split()[0].lower()}-wrk"
            work.mkdir(exist_ok=True)
            results[name] = await measure(peer.url, ctx, work, events, peer.peak_rss_mib)
        finally:
            peer.stop()
    ctx.details["peers"] = {name: vars(figures) for name, figures in results.items()}
    ctx.details["peers"]["bare trio+h11 server"] = {"ingest_rps": bare}
    ctx.rows.extend(rows(results, bare))


PER_EVENT = "ferry (per-event sink)"
BATCHING = "ferry (batching sink)"
FLOOR = "design's floor (bench/skeleton.py, per-event)"
TARGETS = (  # (peer, figure, minimum, the ferry configuration the target is judged on)
    ("Node-RED", "ingest_rps", 4.0, BATCHING),
    ("Huey relay", "ingest_rps", 8.0, BATCHING),
    ("Node-RED", "e2e_rps", 2.0, PER_EVENT),  # issue 16 (issue #8 asked for 1x)
)


def rows(results: dict[str, Figures], bare: float | None = None) -> list[Row]:
    out: list[Row] = []
    for name, fig in results.items():
        out.append(Row(f"peers: {name} ingest (wrk -c50)", fig.ingest_rps, "req/s"))
        out.append(
            Row(
                f"peers: {name} ingest latency p50 / p99",
                fig.p50_ms,
                "ms",
                fig.p99_ms,
                baseline_unit="ms p99",
            )
        )
        out.append(
            Row(
                f"peers: {name} end to end ({fig.e2e_delivered}/{fig.e2e_acked} delivered)",
                fig.e2e_rps,
                "events/s",
            )
        )
        out.append(Row(f"peers: {name} peak RSS", fig.rss_mib, "MiB"))
    for name, key, minimum, judged in TARGETS:
        peer = results.get(name)
        if peer is None:
            continue
        what = "durable ingest" if key == "ingest_rps" else "end to end"
        unit = "req/s" if key == "ingest_rps" else "events/s"
        baseline = getattr(peer, key)
        for ours in (PER_EVENT, BATCHING, FLOOR):
            if ours not in results or (ours == FLOOR and key != "e2e_rps"):
                continue
            value = getattr(results[ours], key)
            ratio = value / baseline if baseline else None
            target = ours == judged
            out.append(
                Row(
                    f"peers: {ours} {what} vs {name}",
                    value,
                    unit,
                    baseline,
                    ratio,
                    f">= {minimum:g}x" if target else "-",
                    passed=(ratio is not None and ratio >= minimum) if target else None,
                )
            )
        if key == "ingest_rps" and bare:
            out.append(
                Row(
                    f"peers: bare trio+h11 server (no work) vs {name}, for scale",
                    bare,
                    "req/s",
                    baseline,
                    bare / baseline if baseline else None,
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter loads and fewer events (a smoke run)")
    args = parser.parse_args(argv)
    if (missing := wrk_missing()) is not None:
        return missing
    with bench_context(args.quick) as ctx:
        trio.run(peers, ctx)
    return report(ctx)


if __name__ == "__main__":
    sys.exit(main())
