"""The CRM sync scenario: realistic Salesforce traffic through ferry into HubSpot and a custom CRM.

    python examples/crm-sync/scenario.py [--contacts 300] [--rate 20] [--outage 120] [--json out.json]

It starts the fakes (fake_crms.py) and `ferry run` on examples/crm-sync/ferry.toml (its own free
ports and a temporary store), then replays, while measuring:

    1. creates      every contact once (`contact.created`), at `--rate` events/s;
    2. steady       random updates at `--rate`/s until the end, with
                    duplicates      a notification re-sent with the same X-Notification-Id (ferry
                                    answers 200 duplicate) or replayed later under a new id;
                    out of order    an update held back and sent after the next one of its contact;
    3. burst        `--burst` updates of 10 contacts as fast as one client sends them, then
                    `--settle` seconds of steady updates;
    4. 429 storm    HubSpot answers 429 to everything for `--storm` seconds;
    5. outage       the custom CRM answers 503 to everything for `--outage` seconds (default 120);
    6. invalid      `--invalid` events with a bad email, which validation must dead-letter;
    7. drain        traffic stops `--cooldown` s after the outage; wait until ferry has nothing
                    pending, then reconcile.

Reconciliation compares the source's final state (the newest LastModifiedDate sent per contact,
mapped as the config maps it) with what each fake destination holds. Figures: sync latency
p50/p99 per destination and phase (a send counts as synced when the destination first holds that
version or a newer one; the `steady` phase — creates and updates before any burst or fault — is
the "within quota" figure; `burst` is the burst and the `--settle` seconds after it),
consistency after drain, error rate on valid input (dead letters), HubSpot requests used vs
quota. Exit status 0 when both destinations are 100 % consistent and no valid event was
dead-lettered, 1 otherwise, 2 if the scenario could not run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from fake_crms import FakeApi, FakeCrm, FakeHubSpot, FakeSalesforce, accounts  # noqa: E402

FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "John", "Radia", "Ken")
LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Backus", "Perlman")


@dataclass
class Sent:
    """One webhook ferry acknowledged: whose, which version, when, and in which phase of the scenario."""

    email: str
    version: str
    at: float
    phase: str


@dataclass
class Source:
    """Salesforce's side: every contact's current record, and the versions it sent."""

    rng: random.Random
    accounts: list[str]
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    clock: dict[str, datetime] = field(default_factory=dict)
    counter: int = 0

    def change(self, email: str, created: bool = False) -> dict[str, Any]:
        """A new version of `email`'s record (its LastModifiedDate later than any before)."""
        now = datetime.now(UTC)
        last = self.clock.get(email)
        stamp = max(now, last + timedelta(milliseconds=1)) if last else now
        stamp = stamp.replace(microsecond=stamp.microsecond // 1000 * 1000)
        self.clock[email] = stamp
        record = dict(self.records.get(email) or self._new(email))
        if not created:
            field_name = self.rng.choice(["FirstName", "LastName", "Phone", "Title", "AccountId"])
            record[field_name] = self._value(field_name)
        record["LastModifiedDate"] = stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"
        self.records[email] = record
        return {"event": "contact.created" if created else "contact.updated", "sobject": record}

    def _new(self, email: str) -> dict[str, Any]:
        self.counter += 1
        return {
            "attributes": {"type": "Contact"},
            "Id": f"003{self.counter:012d}AAA",
            "Email": email,
            "FirstName": self.rng.choice(FIRST),
            "LastName": self.rng.choice(LAST),
            "Phone": self._value("Phone"),
            "Title": self._value("Title"),
            "AccountId": self._value("AccountId"),
        }

    def _value(self, name: str) -> Any:
        rng = self.rng
        if name == "FirstName":
            return rng.choice(FIRST)
        if name == "LastName":
            return rng.choice(LAST)
        if name == "Phone":
            return f"+44 20 {rng.randrange(10**7):07d}"
        if name == "Title":
            return rng.choice(["CTO", "Engineer", "Buyer", "Director", None])
        return rng.choice([*self.accounts, None])  # AccountId: sometimes none


def expected(
    record: dict[str, Any], accounts: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What HubSpot and the custom CRM should hold for a source record (the config's mapping)."""
    account = accounts.get(record.get("AccountId") or "") or {}
    email = record["Email"].lower()
    hubspot = {
        "email": email,
        "firstname": record["FirstName"],
        "lastname": record["LastName"],
        "phone": record["Phone"],
        "jobtitle": record["Title"],
        "company": account.get("Name"),
        "industry": account.get("Industry"),
        "salesforce_id": record["Id"],
        "sf_last_modified": record["LastModifiedDate"],
    }
    crm = {
        "email": email,
        "first_name": record["FirstName"],
        "last_name": record["LastName"],
        "phone": record["Phone"],
        "title": record["Title"],
        "company": account.get("Name"),
        "external_ids": {"salesforce": record["Id"]},
        "updated_at": record["LastModifiedDate"],
    }
    return hubspot, crm


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Ferry:
    """`ferry run` on the example config, rewritten for this run's ports and folder."""

    def __init__(
        self, folder: Path, hubspot: FakeApi, crm: FakeApi, salesforce: FakeApi, retry_cap: str | None
    ) -> None:
        text = (HERE / "ferry.toml").read_text()
        port = free_port()
        text = text.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        for default, api in (("9101", hubspot), ("9102", crm), ("9103", salesforce)):
            text = text.replace(f"127.0.0.1:{default}", f"127.0.0.1:{api.port}")
        text = text.replace('path = "var/crm-sync.db"', f'path = "{folder}/crm-sync.db"')
        text = text.replace('socket = "var/crm-sync.sock"', f'socket = "{folder}/ctl.sock"')
        if retry_cap is not None:
            text = text.replace('max_backoff = "15s"', f'max_backoff = "{retry_cap}"')
        self.config = folder / "ferry.toml"
        self.config.write_text(text)
        self.log = folder / "ferry.log"
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "run", "-c", str(self.config)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.get("msg") == "ready" for line in self.lines()):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"ferry exited with {self.proc.returncode}; see {self.log}")
            time.sleep(0.05)
        raise RuntimeError(f"ferry not ready within {timeout}s; see {self.log}")

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log.read_bytes().splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        return out

    def ctl(self, *args: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "daemon.cli", "ctl", "-c", str(self.config), "--json", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"ferry ctl {' '.join(args)}: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Run:
    """One scenario run: the fakes, ferry, the source, and what was sent when."""

    args: argparse.Namespace
    hubspot: FakeHubSpot
    crm: FakeCrm
    salesforce: FakeSalesforce
    ferry: Ferry
    source: Source
    client: httpx.Client
    sent: list[Sent] = field(default_factory=list)
    phase: str = "steady"
    duplicates: int = 0
    replays: int = 0
    reordered: int = 0
    invalid: int = 0
    notification: int = 0

    def post(self, event: dict[str, Any], *, notification: str | None = None) -> str:
        if notification is None:
            self.notification += 1
            notification = f"04l{self.notification:012d}"
        response = self.client.post(
            "/hooks/salesforce", json=event, headers={"X-Notification-Id": notification}
        )
        if response.status_code not in (200, 202):
            raise RuntimeError(f"webhook answered {response.status_code}: {response.text}")
        if response.status_code == 202 and "Email" in event["sobject"] and "@" in event["sobject"]["Email"]:
            record = event["sobject"]
            self.sent.append(
                Sent(record["Email"].lower(), record["LastModifiedDate"], time.time(), self.phase)
            )
        return notification

    def update(self, email: str) -> None:
        """One update, sometimes duplicated, replayed or reordered (see the module docstring)."""
        rng = self.source.rng
        roll = rng.random()
        if roll < 0.10:  # out of order: the next version arrives first
            older = self.source.change(email)
            newer = self.source.change(email)
            self.post(newer)
            self.post(older)
            self.reordered += 1
            return
        event = self.source.change(email)
        notification = self.post(event)
        if roll < 0.15:  # Salesforce re-sends a notification it did not see acknowledged
            self.post(event, notification=notification)
            self.duplicates += 1
        elif roll < 0.18:  # the same notification replayed later under a new id
            self.pending_replays.append(event)

    pending_replays: list[dict[str, Any]] = field(default_factory=list)


def paced(run: Run, seconds: float, emails: list[str]) -> None:
    """Random updates at `--rate` per second for `seconds`, replaying held-back notifications now and then."""
    rng = run.source.rng
    interval = 1.0 / run.args.rate
    end = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < end:
        run.update(rng.choice(emails))
        if run.pending_replays and rng.random() < 0.2:
            run.post(run.pending_replays.pop(0))
            run.replays += 1
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))


def scenario(run: Run) -> None:
    args, rng = run.args, run.source.rng
    emails = [f"{rng.choice(FIRST).lower()}.{n}@example.com" for n in range(args.contacts)]
    log(f"creates: {len(emails)} contacts at {args.rate}/s")
    interval = 1.0 / args.rate
    for email in emails:
        run.post(run.source.change(email, created=True))
        time.sleep(interval)
    log(f"steady updates for {args.warmup:g}s")
    paced(run, args.warmup, emails)
    log(f"burst: {args.burst} updates of 10 contacts")
    hot = rng.sample(emails, min(10, len(emails)))
    run.phase = "burst"
    for _ in range(args.burst):
        run.update(rng.choice(hot))
    log(f"steady updates for {args.settle:g}s (the burst settles)")
    paced(run, args.settle, emails)
    log(f"429 storm at HubSpot for {args.storm:g}s")
    run.phase = "storm"
    run.hubspot.storm(args.storm)
    paced(run, args.storm, emails)
    log(f"custom CRM outage for {args.outage:g}s")
    run.phase = "outage"
    run.crm.outage(args.outage)
    paced(run, args.outage, emails)
    for n in range(args.invalid):  # not a change of any contact: the source's state stays as it is
        record = run.source.records[rng.choice(emails)]
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"
        run.post(
            {
                "event": "contact.updated",
                "sobject": {**record, "Email": f"not-an-email-{n}", "LastModifiedDate": stamp},
            }
        )
        run.invalid += 1
    run.phase = "after"
    log(f"cooldown {args.cooldown:g}s")
    paced(run, args.cooldown, emails)
    while run.pending_replays:
        run.post(run.pending_replays.pop(0))
        run.replays += 1


def drain(run: Run, timeout: float) -> float:
    """Wait until ferry has nothing pending anywhere; the seconds it took."""
    started = time.monotonic()
    quiet = 0
    while time.monotonic() - started < timeout:
        stages = run.ferry.ctl("status")["stages"]
        pending = sum(stage["pending"] for stage in stages.values())
        quiet = quiet + 1 if pending == 0 else 0
        if quiet >= 2:
            return time.monotonic() - started
        time.sleep(0.5)
    raise RuntimeError(f"not drained within {timeout:g}s: {stages}")


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(share * len(ordered))) - 1]


PHASES = ("steady", "burst", "storm", "outage", "after")


def latencies(run: Run, api: FakeApi) -> dict[str, Any]:
    """Per send: seconds until `api` first held that version or a newer one of the contact, by phase.

    `steady` is creates and steady updates before any burst or fault: the "within quota" figure;
    `burst` the burst and the `--settle` seconds after it.
    """
    writes: dict[str, list[tuple[float, str]]] = {}
    with api.lock:
        for write in api.writes:
            writes.setdefault(write.key, []).append((write.at, write.version))
    delays: dict[str, list[float]] = {phase: [] for phase in PHASES}
    missing = 0
    for sent in run.sent:
        synced = next((at for at, version in writes.get(sent.email, []) if version >= sent.version), None)
        if synced is None:
            missing += 1
            continue
        delays[sent.phase].append(max(0.0, synced - sent.at))
    result: dict[str, Any] = {
        phase: {
            "sends": len(values),
            "p50_s": rnd(percentile(values, 0.5)),
            "p99_s": rnd(percentile(values, 0.99)),
            "max_s": rnd(max(values, default=None)),
        }
        for phase, values in delays.items()
    }
    result["never_synced"] = missing
    return result


def rnd(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def reconcile(run: Run) -> dict[str, Any]:
    """Compare the source's final state with each destination's; the mismatches, by contact."""
    result: dict[str, Any] = {}
    for name, api, index in (("hubspot", run.hubspot, 0), ("custom_crm", run.crm, 1)):
        matched, wrong = 0, []
        with api.lock:
            state = dict(api.state)
        for email, record in run.source.records.items():
            want = expected(record, run.salesforce.accounts)[index]
            have = state.get(email.lower())
            if have == want:
                matched += 1
            else:
                wrong.append({"email": email, "want": want, "have": have})
        total = len(run.source.records)
        result[name] = {
            "contacts": total,
            "consistent": matched,
            "consistency_pct": round(100.0 * matched / total, 4) if total else None,
            "mismatches": wrong[:5],
        }
    return result


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scenario.py", description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=300)
    parser.add_argument("--rate", type=float, default=20, help="steady webhooks per second")
    parser.add_argument("--warmup", type=float, default=30, help="seconds of steady updates before the burst")
    parser.add_argument("--burst", type=int, default=300)
    parser.add_argument("--settle", type=float, default=10, help="seconds of steady updates after the burst")
    parser.add_argument("--storm", type=float, default=15, help="seconds of HubSpot 429s")
    parser.add_argument("--outage", type=float, default=120, help="seconds the custom CRM is down")
    parser.add_argument("--cooldown", type=float, default=10)
    parser.add_argument(
        "--invalid", type=int, default=5, help="events with a bad email (must be dead-lettered)"
    )
    parser.add_argument("--retry-cap", help='replace the sinks\' max_backoff (e.g. "2s" for a short run)')
    parser.add_argument("--drain-timeout", type=float, default=600)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (config, store, log)")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="crm-sync-"))
    rng = random.Random(args.seed)
    known = accounts(40)
    apis = (FakeHubSpot().start(), FakeCrm().start(), FakeSalesforce(known).start())
    hubspot, crm, salesforce = apis
    ferry = Ferry(folder, hubspot, crm, salesforce, args.retry_cap)
    started = time.time()
    try:
        ferry.start()
        with httpx.Client(base_url=ferry.url, timeout=30) as client:
            run = Run(args, hubspot, crm, salesforce, ferry, Source(rng, list(known)), client)
            scenario(run)
        traffic_s = time.time() - started
        log(f"sent {len(run.sent)} accepted webhooks; draining")
        drain_s = drain(run, args.drain_timeout)
        dead = ferry.ctl("dlq", "list", "--limit", "1000")
        stats = ferry.ctl("stats")
    except Exception as exc:  # the scenario could not run: say why and where the logs are
        log(f"error: {exc} (folder {folder})")
        ferry.stop()
        for api in apis:
            api.stop()
        return 2
    ferry.stop()
    for api in apis:
        api.stop()

    consistency = reconcile(run)
    invalid_dead = sum(1 for item in dead["items"] if "not-an-email" in (item.get("last_error") or ""))
    valid_dead = dead["total"] - invalid_dead
    valid_sent = len(run.sent)
    figures = {
        "machine": f"{os.cpu_count()} CPU, {platform.platform()}, Python {platform.python_version()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": {
            key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
        },
        "traffic": {
            "webhooks_accepted": valid_sent,
            "contacts": len(run.source.records),
            "duplicates_same_id": run.duplicates,
            "replays_new_id": run.replays,
            "reordered_pairs": run.reordered,
            "invalid": run.invalid,
            "seconds": round(traffic_s, 1),
            "drain_s": round(drain_s, 1),
        },
        "latency": {
            "hubspot": latencies(run, hubspot),
            "custom_crm": latencies(run, crm),
        },
        "consistency": consistency,
        "errors": {
            "valid_dead_lettered": valid_dead,
            "error_rate_valid": round(valid_dead / valid_sent, 6) if valid_sent else None,
            "invalid_dead_lettered": invalid_dead,
        },
        "hubspot_quota": {
            "requests": hubspot.count(),
            "answered_429": hubspot.count(lambda status: status == 429),
            "max_requests_in_10s": hubspot.max_in_window,
            "quota_per_10s": FakeHubSpot.QUOTA,
            "contacts_written": len(hubspot.writes),
            "inputs_per_request": round(len(hubspot.writes) / max(1, hubspot.count(lambda s: s == 200)), 1),
        },
        "custom_crm": {"requests": crm.count(), "answered_503": crm.count(lambda status: status == 503)},
        "ferry_stats": dict(stats["stages"].items()),
        "salesforce_lookups": salesforce.count(),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if not args.keep:
        for path in sorted(folder.rglob("*"), reverse=True):
            path.unlink() if path.is_file() or path.is_socket() else path.rmdir()
        folder.rmdir()
    ok = all(c["consistent"] == c["contacts"] for c in consistency.values()) and valid_dead == 0
    ok = ok and invalid_dead == run.invalid
    log(
        "PASS: both destinations consistent, no valid event dead-lettered"
        if ok
        else "FAIL: see the figures above"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
