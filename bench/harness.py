"""What the benchmark cases share: wrk, the daemon as a process, its config, its store, its memory.

The daemon runs as `ferry run -c FILE` in its own process (through `tests.fakes.Daemon`,
the same harness the end-to-end tests use), on a config written to a temporary folder,
with its listener on 127.0.0.1 and a free port. `Skeleton` runs the design's floor
(`bench.skeleton`) the same way, for the same readings.
"""

from __future__ import annotations

import calendar
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from bench.listener_bench import PATH, WRK_SCRIPT, WrkResult, parse_wrk, run_wrk
from daemon.store.schema import DEAD, DELIVERED, PENDING
from tests.fakes import ROOT, Daemon

TRACES = os.environ.get("FERRY_BENCH_TRACES", "0") != "0"  # FERRY_BENCH_TRACES=0: [telemetry] traces = false
SAMPLE_RATIO = float(os.environ.get("FERRY_BENCH_SAMPLE_RATIO", "1.0"))
# Extra `[telemetry]` lines for every daemon, e.g. FERRY_BENCH_TELEMETRY='metrics = false' to
# measure what the metric instruments cost.
TELEMETRY = os.environ.get("FERRY_BENCH_TELEMETRY", "").replace(";", "\n")
SOURCE = PATH.rsplit("/", 1)[1]  # the webhook source wrk posts to
SINK = "out"
RESHAPE = '{id, name: "\\(.first) \\(.last)", email}'

CONFIG = """
[store]
path = "{folder}/ferry.db"
durability = "full"
retention = "1h"

[listener]
address = "127.0.0.1:0"

[control]
socket = "{folder}/ferry.sock"

[supervisor]
shutdown_grace = "1s"

[telemetry]
traces = {traces}
sample_ratio = {sample_ratio}
{endpoint}
{telemetry}

[sources.{source}]
type = "webhook"
"""

PIPELINE = """
[transforms.shape]
inputs = ["{source}"]
map = '{map}'

[sinks.{sink}]
type = "http"
inputs = ["shape"]
url = "{url}"
concurrency = {concurrency}
timeout = "{timeout}"
{batch}
"""

COUNT_LIMIT = """
local count = 0
function response(status, headers, body)
  count = count + 1
  if count == {limit} then
    local marker = io.open("{marker}", "a")
    marker:write("done\\n")
    marker:close()
    wrk.thread:stop()
  end
end
"""


def ensure_wrk() -> str | None:
    """None if wrk is usable (installing it with apt-get when possible), else why not."""
    if shutil.which("wrk"):
        return None
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk is missing: apt-get install -y wrk", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, timeout=300)
        if shutil.which("wrk"):
            return None
    return "wrk is not installed and could not be installed: run `apt-get install -y wrk`, then try again"


def wrk_missing() -> int | None:
    """For a benchmark's `main`: None if wrk is usable (`ensure_wrk`), else 2 (its exit status: the
    benchmark cannot run) after saying why on stderr. Every module that drives wrk calls it first,
    so that run alone it stops with the reason instead of a `FileNotFoundError` half-way."""
    problem = ensure_wrk()
    if problem is None:
        return None
    print(problem, file=sys.stderr)
    return 2


def wrk_script(folder: Path) -> Path:
    """The POST script of `listener_bench`."""
    path = folder / "post.lua"
    path.write_text(WRK_SCRIPT)
    return path


async def post_load(
    url: str, script: Path, *, duration: float, threads: int = 2, connections: int = 50
) -> WrkResult:
    """wrk's timed load (`listener_bench.run_wrk`) against the daemon's webhook."""
    return await run_wrk(url + PATH, script, threads=threads, connections=connections, duration=duration)


async def post_count(
    url: str, folder: Path, count: int, *, limit_s: float, threads: int = 2, connections: int = 50
) -> WrkResult:
    """About `count` POSTs with wrk: each thread stops after its share of answers, then wrk is stopped.

    (wrk itself always runs for its whole `-d`; a thread that is done writes a marker line, and
    once every thread has, wrk gets SIGINT and prints its summary.) Requests still in flight
    when a thread stops may be stored too, so count stored events, not wrk's requests.
    """
    marker = folder / f"wrk-{count}.done"
    marker.unlink(missing_ok=True)
    script = folder / f"post-{count}.lua"
    script.write_text(WRK_SCRIPT + COUNT_LIMIT.format(limit=max(1, count // threads), marker=marker))
    output = folder / f"wrk-{count}.out"
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{int(limit_s) + 1}s",
        "-s",
        str(script),
        url + PATH,
    ]
    with output.open("wb") as sink:
        proc = await trio.lowlevel.open_process(command, stdout=sink, stderr=subprocess.STDOUT)
        try:
            with trio.move_on_after(limit_s):
                while proc.poll() is None and (
                    not marker.exists() or len(marker.read_text().split()) < threads
                ):
                    await trio.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                await proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                await proc.wait()
    return parse_wrk(output.read_text())


def write_config(
    folder: Path,
    url: str | None,
    *,
    batch: bool = False,
    concurrency: int = 8,
    map_: str = RESHAPE,
    timeout: str = "10s",
    traces: bool = TRACES,
    sample_ratio: float = SAMPLE_RATIO,
    otlp: str | None = None,
) -> Path:
    """webhook `SOURCE` -> transform `shape` (jq `map_`) -> http sink `SINK` posting to `url`.

    With `url` None: the webhook source alone (events are stored, nothing reads them).
    `traces`, `sample_ratio` and `otlp` (the collector's base URL) set `[telemetry]`; by default
    from `FERRY_BENCH_TRACES` / `FERRY_BENCH_SAMPLE_RATIO`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ferry.toml"
    text = CONFIG.format(
        folder=folder,
        source=SOURCE,
        traces=str(traces).lower(),
        sample_ratio=sample_ratio,
        endpoint=f'endpoint = "{otlp}"' if otlp else "",
        telemetry=TELEMETRY,
    )
    if url is not None:
        text += PIPELINE.format(
            source=SOURCE,
            sink=SINK,
            map=map_,
            url=url,
            concurrency=concurrency,
            timeout=timeout,
            batch='batch = { max_items = 500, max_wait = "20ms" }' if batch else "",
        )
    path.write_text(text)
    return path


@dataclass
class Ferry:
    """One `ferry run` process: when it was launched, when it logged READY, and how to read its store."""

    folder: Path
    daemon: Daemon
    launched: float
    ready_at: float
    startup_s: float

    @classmethod
    def start(cls, folder: Path, config: Path, running: list[Ferry], tree: Path | None = None) -> Ferry:
        """Start the daemon and wait for READY; it is appended to `running` (for cleanup) at once.

        `tree`: run the ferry of that source tree instead (another checkout, to compare against).
        """
        daemon = Daemon(config, folder / f"ferry-{len(running)}.log")
        if tree is not None:  # `-m daemon.cli` imports from the working directory first
            daemon.launcher = ["env", f"--chdir={tree}"]
        ferry = cls(folder, daemon, time.time(), 0.0, 0.0)
        running.append(ferry)
        daemon.start(timeout=60)
        line = daemon.wait_log(lambda entry: entry.get("msg") == "ready")
        ferry.ready_at = log_time(line["ts"])
        ferry.startup_s = float(line["startup_s"])
        return ferry

    @property
    def url(self) -> str:
        return self.daemon.url

    @property
    def address(self) -> str:
        """The listener's `host:port`."""
        return self.daemon.address

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far."""
        return process_cpu(self.pid)

    def thread_cpu(self) -> tuple[float, float, int]:
        """`threads_cpu` of the process."""
        return threads_cpu(self.pid)

    def peak_rss_mib(self) -> float | None:
        """The process's peak resident set (VmHWM), while it still runs."""
        return peak_rss_mib(self.pid)

    def query(self, sql: str, *params: object) -> int:
        """One integer from the store, through a read-only connection of our own."""
        return query(self.folder / "ferry.db", sql, *params)

    def accepted(self) -> int:
        """Events stored by the webhook source (every one of them was, or was about to be, answered 202)."""
        return accepted(self.folder / "ferry.db")

    def deliveries(self, state: int | None = None) -> int:
        """The sink's deliveries in `state` (all when None)."""
        if state is None:
            return self.query("SELECT count(*) FROM deliveries WHERE stage = ?", SINK)
        return self.query("SELECT count(*) FROM deliveries WHERE stage = ? AND state = ?", SINK, state)

    def counts(self) -> dict[str, int]:
        """The sink's deliveries by state."""
        return {
            name: self.deliveries(state)
            for name, state in (("pending", PENDING), ("delivered", DELIVERED), ("dead", DEAD))
        }

    def errors_logged(self) -> list[str]:
        return [
            str(entry.get("msg"))
            for entry in self.daemon.logs()
            if entry.get("level") in ("error", "critical")
        ]

    def stop(self) -> int | None:
        self.daemon.stop()
        return None if self.daemon.proc is None else self.daemon.proc.returncode


def peak_rss_mib(pid: int) -> float | None:
    """A running process's peak resident set (VmHWM) in MiB; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def process_cpu(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads_cpu(pid: int) -> tuple[float, float, int]:
    """(CPU seconds of process `pid`'s main thread — the event loop's —, CPU seconds of every other
    thread — the store's writer thread, mostly —, context switches of all threads, voluntary and
    not) so far (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    loop = others = 0.0
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat, status = (task / "stat").read_text(), (task / "status").read_text()
        except OSError:  # a thread that ended meanwhile
            continue
        fields = stat.rpartition(")")[2].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick
        if task.name == str(pid):
            loop += seconds
        else:
            others += seconds
        switches += sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)
    return loop, others, switches


def query(db: Path, sql: str, *params: object) -> int:
    """One integer from the SQLite outbox `db`, through a read-only connection of our own."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute(sql, params).fetchone()[0] or 0)
    finally:
        conn.close()


def accepted(db: Path) -> int:
    """Events the webhook source `SOURCE` stored in the outbox `db` (each was, or was about to be,
    answered 202)."""
    return query(db, "SELECT count(*) FROM events WHERE stream = ?", SOURCE)


class Skeleton:
    """`python -m bench.skeleton` (the design's floor) as a child process, read like `Ferry`: its CPU from
    /proc, its stored events from its SQLite file (`folder/ferry.db`). `batch`: its batching sink
    (`--batch`)."""

    def __init__(self, folder: Path, url: str, *, batch: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.db = folder / "ferry.db"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.skeleton", "--db", str(self.db), "--url", url]
            + (["--batch"] if batch else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # its port, once serving; "" if it died first
        if not line:
            self.proc.wait(10)
            raise RuntimeError(f"bench.skeleton exited with {self.proc.returncode} before serving")
        self.url = f"http://127.0.0.1:{int(line)}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return process_cpu(self.pid)

    def thread_cpu(self) -> tuple[float, float, int]:
        return threads_cpu(self.pid)

    def accepted(self) -> int:
        return accepted(self.db)

    def stop(self) -> None:
        """Close its stdin (it stops), killing it if it has not within 10 s."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def log_time(ts: str) -> float:
    """A log line's `ts` (`2024-05-01T12:00:00.123Z`, UTC) as a Unix time."""
    whole, _, millis = ts.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis or 0) / 1000
