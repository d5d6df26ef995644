"""`ferry check` catches what `ferry run` would fail on later; `ferry run` refuses it the same way.

Each case is a config error naming its TOML path: exit 2 (which systemd does not restart in a
loop), the message on stderr, never a traceback, from both commands as real subprocesses.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import ROOT, write_config

PIPELINE = """
[sources.demo]
type = "webhook"

[sinks.crm]
type = "http"
inputs = ["demo"]
url = "http://127.0.0.1:9/contacts"
"""

CASES = {
    "missing-control-group": (
        '[control]\ngroup = "ferry-no-such-group"\n',
        "$.control.group: no such group 'ferry-no-such-group' on this machine",
    ),
    "rate-inf": (
        "[rate_limits.api]\nrate = inf\n",
        "$.rate_limits.api.rate: must be a finite number, got inf",
    ),
    "rate-nan": ("[rate_limits.api]\nrate = nan\n", "$.rate_limits.api.rate: Expected `float` > 0.0"),
    "rate-negative": ("[rate_limits.api]\nrate = -5.0\n", "$.rate_limits.api.rate: Expected `float` > 0.0"),
    "toml-nested-2000": (
        "[alerting]\nx = " + "[" * 2000 + "]" * 2000 + "\n",
        "$: invalid TOML: nested more than 64 levels deep",
    ),
    "inline-tables-nested-100": (
        "[alerting]\nx = " + "{ a = " * 100 + "1" + " }" * 100 + "\n",
        "$.alerting.x.a: nested more than 64 levels deep",
    ),
    "header-value-crlf": (
        PIPELINE + 'headers = { "X-Source" = "ferry\\r\\nX-Admin: yes" }\n',
        "$.sinks.crm.headers.X-Source: 'ferry\\r\\nX-Admin: yes' holds a CR, LF or NUL",
    ),
    "header-name-lf": (
        PIPELINE + 'headers = { "X-Source\\nX-Admin" = "yes" }\n',
        "$.sinks.crm.headers: 'X-Source\\nX-Admin' is not a valid header name",
    ),
    "idempotency-header-crlf": (
        PIPELINE + 'idempotency_header = "Key\\r\\n"\n',
        "$.sinks.crm.idempotency_header: 'Key\\r\\n' is not a valid header name",
    ),
    "zero-header-timeout": ('header_timeout = "0s"\n', "$.listener.header_timeout: must be more than 0s"),
    "zero-body-timeout": ('body_timeout = "0ms"\n', "$.listener.body_timeout: must be more than 0s"),
    "zero-idle-timeout": ("idle_timeout = 0\n", "$.listener.idle_timeout: must be more than 0s"),
    "max-header-0": ("max_header = 0\n", "$.listener.max_header: must be at least 256 bytes"),
    "file-sink-path-is-a-folder": (
        '[sources.demo]\ntype = "webhook"\n[sinks.out]\ntype = "file"\ninputs = ["demo"]\npath = "outbox"\n',
        "$.sinks.out.path: {dir}/outbox is a folder; give the file to append to",
    ),
}


def ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("case", list(CASES))
def test_check_and_run_refuse_it_with_exit_2_and_the_toml_path(tmp_path: Path, case: str) -> None:
    body, message = CASES[case]
    if body.startswith(("header_timeout", "body_timeout", "idle_timeout", "max_header")):
        config = write_config(tmp_path, "")  # these go under the [listener] table write_config opens
        text = config.read_text().replace("[supervisor]", body + "\n[supervisor]")
        config.write_text(text)
    else:
        config = write_config(tmp_path, body)
    (tmp_path / "outbox").mkdir()
    expected = message.format(dir=tmp_path)
    for command in ("check", "run"):
        done = ferry(command, "-c", str(config))
        assert done.returncode == 2, (command, done.stdout, done.stderr[-2000:])
        assert f"  {expected}" in done.stderr, (command, done.stderr[-2000:])
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "state").exists()  # refused before anything was created
