"""`ferry test` as a real subprocess: passing cases, a failing case's diff, bad test files and configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import ROOT

CONFIG = """
[sources.sf]
type = "webhook"

[transforms.contact]
inputs = ["sf"]
schema = { type = "object", required = ["email"], properties = { email = { format = "email" } } }
filter = '.type != "spam"'
map = '{kind: .type, email}'
routes = [{ when = '.kind == "lead"', to = ["crm"] }]
default_route = ["hubspot", "crm"]

[transforms.totals]
inputs = ["sf"]
aggregate = { key = ".category", max_events = 2, reduce = '{category: .[0].category, n: length}' }

[sinks.crm]
type = "http"
inputs = ["contact", "totals"]
url = "http://127.0.0.1:9/crm"

[sinks.hubspot]
type = "http"
inputs = ["contact"]
url = "http://127.0.0.1:9/hubspot"
"""

PASSING = """
[[tests]]
name = "a lead goes to the CRM only, a contact to both; spam is dropped"
transform = "contact"
inputs = [
  { type = "lead", email = "ada@example.com" },
  { type = "contact", email = "alan@example.com" },
  { type = "spam", email = "x@example.com" },
]
outputs = [
  { event = { kind = "lead", email = "ada@example.com" }, to = ["crm"] },
  { event = { kind = "contact", email = "alan@example.com" }, to = ["crm", "hubspot"] },
]

[[tests]]
name = "an invalid email is dead-lettered"
transform = "contact"
inputs = [{ type = "lead", email = "nope" }, { type = "lead" }]
dead = [
  { input = 0, error = "$.email: 'nope' is not a 'email'" },
  { input = 1, error = "'email' is a required property" },
]

[[tests]]
name = "windows of two per category; the rest closes at the end"
transform = "totals"
inputs = [{ category = "a" }, { category = "b" }, { category = "a" }, { category = "b" }, { category = "a" }]
outputs = [
  { event = { category = "a", n = 2 }, to = ["crm"] },
  { event = { category = "b", n = 2 } },
  { event = { category = "a", n = 1 } },
]
"""

FAILING = """
[[tests]]
name = "still passes"
transform = "contact"
inputs = [{ type = "lead", email = "ada@example.com" }]
outputs = [{ event = { kind = "lead", email = "ada@example.com" } }]

[[tests]]
name = "expects the wrong route and shape"
transform = "contact"
inputs = [{ type = "lead", email = "ada@example.com" }, { type = "lead", email = "bad" }]
outputs = [{ event = { kind = "contact", email = "ada@example.com" }, to = ["hubspot"] }]
"""


def ferry_test(tmp_path: Path, *files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "test", "-c", str(tmp_path / "ferry.toml"), *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "NO_PROXY": "*"},
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "ferry.toml"
    path.write_text(CONFIG)
    return path


def test_passing_cases_exit_0(tmp_path: Path, config: Path) -> None:
    (tmp_path / "ok.toml").write_text(PASSING)
    done = ferry_test(tmp_path, str(tmp_path / "ok.toml"))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[1:] == [
        "  ok    a lead goes to the CRM only, a contact to both; spam is dropped",
        "  ok    an invalid email is dead-lettered",
        "  ok    windows of two per category; the rest closes at the end",
        "3 passed, 0 failed",
    ]


def test_json_test_files_work_too(tmp_path: Path, config: Path) -> None:
    case = {
        "name": "json",
        "transform": "contact",
        "inputs": [{"type": "lead", "email": "a@b.c"}],
        "outputs": [{"event": {"kind": "lead", "email": "a@b.c"}, "to": ["crm"]}],
    }
    (tmp_path / "t.json").write_text(json.dumps({"tests": [case]}))
    done = ferry_test(tmp_path, str(tmp_path / "t.json"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_mismatch_exits_1_with_a_readable_diff(tmp_path: Path, config: Path) -> None:
    (tmp_path / "bad.toml").write_text(FAILING)
    done = ferry_test(tmp_path, str(tmp_path / "bad.toml"))
    assert done.returncode == 1
    out = done.stdout
    assert "  ok    still passes" in out
    assert "  FAIL  expects the wrong route and shape (contact)" in out
    assert "        outputs differ (- expected, + actual):" in out
    assert '-      "kind": "contact",' in out
    assert '+      "kind": "lead",' in out
    assert '-      "hubspot"' in out
    assert '+      "crm"' in out
    assert "        input 1 was dead-lettered unexpectedly: schema: 1 violation(s): $.email:" in out
    assert out.endswith("1 passed, 1 failed\n")


@pytest.mark.parametrize(
    ("text", "name", "problems"),
    [
        ("tests = [", "t.toml", ["  $: invalid TOML: "]),
        ("{", "t.json", ["  $: invalid JSON: "]),
        ("", "t.toml", ["  $: Object missing required field `tests`"]),
        (
            '[[tests]]\nname = "x"\ntransform = "contact"\ninputs = []\n',
            "t.toml",
            ["  $.tests[0].inputs: Expected `array` of length >= 1"],
        ),
        (
            '[[tests]]\nname = "x"\ntransform = "contact"\ninputs = [1]\nexpect = []\n',
            "t.toml",
            ["  $.tests[0]: Object contains unknown field `expect`"],
        ),
        (
            '[[tests]]\nname = "x"\ntransform = "ghost"\ninputs = [1]\n'
            '[[tests]]\nname = "y"\ntransform = "contact"\ninputs = [1]\n'
            'outputs = [{ event = 1, to = ["nowhere"] }]\ndead = [{ input = 3 }]\n',
            "t.toml",
            [
                "  $.tests[0].transform: no transform 'ghost' in the config (transforms: contact, totals)",
                "  $.tests[1].outputs[0].to[0]: 'nowhere' is not a sink reading 'contact'",
                "  $.tests[1].dead[0].input: 3, but there are 1 inputs",
            ],
        ),
    ],
)
def test_bad_test_files_exit_2_naming_each_problem(
    tmp_path: Path, config: Path, text: str, name: str, problems: list[str]
) -> None:
    (tmp_path / name).write_text(text)
    done = ferry_test(tmp_path, str(tmp_path / name))
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[0] == f"{tmp_path / name}: invalid test file ({len(problems)} error(s))"
    assert len(lines) == 1 + len(problems), done.stderr
    for line, expected in zip(lines[1:], problems, strict=True):
        assert line.startswith(expected), line
    assert done.stdout == ""


def test_a_missing_file_and_a_bad_config_exit_2(tmp_path: Path, config: Path) -> None:
    done = ferry_test(tmp_path, str(tmp_path / "missing.toml"))
    assert done.returncode == 2
    assert "missing.toml: invalid test file (1 error(s))" in done.stderr
    assert "cannot read" in done.stderr
    config.write_text(CONFIG + '[transforms.broken]\ninputs = ["sf"]\nmap = ".a +"\n')
    (tmp_path / "ok.toml").write_text(PASSING)
    done = ferry_test(tmp_path, str(tmp_path / "ok.toml"))
    assert done.returncode == 2
    assert "$.transforms.broken.map: invalid jq program" in done.stderr


def test_the_case_studys_mappings_pass() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "test",
            "-c",
            "examples/crm-sync/ferry.toml",
            "examples/crm-sync/transforms.test.toml",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.endswith("2 passed, 0 failed\n")
