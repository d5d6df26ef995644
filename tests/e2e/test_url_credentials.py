"""Credentials in a sink URL are secrets; ordinary header values are not (real daemon, real CLI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.fakes import ROOT, Daemon, ctl, ctl_json, free_port, until, write_config

PASSWORD = "pw7"  # short on purpose: a short secret is scrubbed as a word, never inside one
CONFIG = """
[telemetry]
traces = false
metrics = false
log_level = "debug"

[control]
socket = "{socket}"

[sources.demo]
type = "webhook"

[sinks.crm]
type = "http"
inputs = ["demo"]
url = "http://ferry:{password}@127.0.0.1:{port}/contacts"
headers = {{ "X-Source" = "e", "X-Api-Token" = "tok-0123456789" }}
retry = {{ max_attempts = 1 }}
"""


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "check", "-c", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def configured(tmp_path: Path, sock_dir: Path) -> Path:
    return write_config(
        tmp_path, CONFIG.format(socket=sock_dir / "ferry.sock", password=PASSWORD, port=free_port())
    )


def test_ferry_check_warns_about_credentials_in_a_url(tmp_path: Path, sock_dir: Path) -> None:
    checked = check(configured(tmp_path, sock_dir))
    assert checked.returncode == 0, checked.stderr
    assert "$.sinks.crm.url: credentials in a URL; put them in `auth`" in checked.stderr
    assert PASSWORD not in checked.stderr + checked.stdout


def test_url_credentials_and_secret_headers_are_never_shown_ordinary_headers_are(
    tmp_path: Path, sock_dir: Path
) -> None:
    config = configured(tmp_path, sock_dir)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        answer = httpx.post(f"{daemon.url}/hooks/demo", json={"name": "Ada", "note": "every level"})
        assert answer.status_code == 202
        until(lambda: ctl_json(config, "dlq", "list")["total"], lambda total: total == 1)  # nobody listens
        letter = ctl_json(config, "dlq", "list")["items"][0]
        shown = [
            ctl(config, "status").stdout,
            ctl(config, "--json", "status").stdout,
            ctl(config, "dlq", "list").stdout,
            json.dumps(ctl_json(config, "dlq", "list")),
            ctl(config, "dlq", "show", letter["id"]).stdout,
            json.dumps(ctl_json(config, "dlq", "show", letter["id"])),
            (tmp_path / "daemon.log").read_text(),
        ]
    finally:
        daemon.stop()
    status = json.loads(shown[1])
    assert [e["url"] for e in status["guards"]["crm"]["endpoints"]] == [
        f"http://***@127.0.0.1:{config_port(config)}/contacts"
    ]
    for text in shown:
        assert f":{PASSWORD}@" not in text
        assert "tok-0123456789" not in text  # a secret header's value
    logs = [json.loads(line) for line in shown[-1].splitlines() if line.startswith("{")]
    # "e" is an ordinary header value: words holding an "e" are left alone
    assert any(line["msg"] == "control socket listening" for line in logs)
    assert json.loads(shown[5])["delivery"]["payload"] == {"name": "Ada", "note": "every level"}


def config_port(config: Path) -> int:
    text = config.read_text()
    return int(text.split("@127.0.0.1:")[1].split("/")[0])
