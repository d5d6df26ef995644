"""Config decoding and validation: every problem named by its TOML path, all of them at once."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from actors.sink.config import FileSinkConfig, HttpSinkConfig
from actors.webhook.config import WebhookSourceConfig, webhook_path
from daemon.cli.ferry import main
from daemon.config.root import load, node_id, parse
from daemon.errors import ConfigError

# The sample from DESIGN.md, verbatim.
DESIGN_SAMPLE = """
[store]
path = "var/ferry.db"
durability = "full"                 # full | normal

[listener]
address = "127.0.0.1:8080"
max_body = "1MiB"

[control]
socket = "var/ferry.sock"

[sources.demo]
type = "webhook"                    # POST /hooks/demo
idempotency_header = "Idempotency-Key"

[transforms.shape]
inputs = ["demo"]
map = '{id: .id, name: (.first + " " + .last)}'   # jq

[sinks.crm]
type = "http"
inputs = ["shape"]
url = "http://127.0.0.1:9000/contacts"
retry = { max_attempts = 8, initial_backoff = "500ms", max_backoff = "5m" }
"""

PIPELINE = """
[sources.demo]
type = "webhook"

[transforms.shape]
inputs = ["demo"]

[sinks.crm]
type = "http"
inputs = ["shape"]
url = "http://127.0.0.1:9000/contacts"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_design_sample_parses_with_typed_units() -> None:
    config = parse(DESIGN_SAMPLE)

    assert config.listener.max_body == 1024**2
    demo = config.sources["demo"]
    assert isinstance(demo, WebhookSourceConfig)
    assert webhook_path("demo", demo) == "/hooks/demo"
    assert config.transforms["shape"].inputs == ["demo"]
    crm = config.sinks["crm"]
    assert isinstance(crm, HttpSinkConfig)
    assert (crm.retry.max_attempts, crm.retry.initial_backoff, crm.retry.max_backoff) == (8, 0.5, 300.0)


def test_empty_file_is_a_valid_config_of_defaults() -> None:
    config = parse("")
    assert config.store.durability == "full"
    assert (config.sources, config.transforms, config.sinks) == ({}, {}, {})


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param("bogus = 1\n", "$.sinks.crm.bogus: unknown key", id="unknown-key"),
        pytest.param(
            "retry = { bogus = 1 }\n", "$.sinks.crm.retry.bogus: unknown key", id="unknown-nested-key"
        ),
        pytest.param(
            'retry = { max_attempts = "8" }\n',
            "$.sinks.crm.retry.max_attempts: Expected `int`, got `str`",
            id="wrong-type",
        ),
        pytest.param(
            "retry = { max_attempts = 0 }\n",
            "$.sinks.crm.retry.max_attempts: Expected `int` >= 1",
            id="out-of-range",
        ),
        pytest.param(
            'retry = { initial_backoff = "soon" }\n',
            "$.sinks.crm.retry.initial_backoff: invalid duration 'soon'",
            id="bad-duration",
        ),
        pytest.param(
            'retry = { initial_backoff = "10m", max_backoff = "1m" }\n',
            "$.sinks.crm.retry.initial_backoff: larger than max_backoff",
            id="backoff-order",
        ),
        pytest.param(
            'batch = { max_bytes = "1 zettabyte" }\n',
            "$.sinks.crm.batch.max_bytes: invalid size '1 zettabyte'",
            id="bad-size",
        ),
        pytest.param('method = "GET"\n', "$.sinks.crm.method: Invalid enum value 'GET'", id="bad-enum"),
        pytest.param(
            "headers = { X-Count = 1 }\n",
            "$.sinks.crm.headers[...]: Expected `str`, got `int`",
            id="bad-header",
        ),
    ],
)
def test_sink_errors_name_their_toml_path(extra: str, expected: str) -> None:
    [problem] = problems(PIPELINE + extra)
    assert problem.startswith(expected), problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("[bogus]\nx = 1\n", "$.bogus: unknown section", id="unknown-section"),
        pytest.param("sinks = 5\n", "$.sinks: expected a table of named components", id="sinks-not-a-table"),
        pytest.param("[store\n", "$: invalid TOML", id="invalid-toml"),
        pytest.param(
            '[sources."bad name"]\ntype = "webhook"\n', "$.sources.bad name: invalid name", id="bad-name"
        ),
        pytest.param(
            '[sources.demo]\ntype = "kafka"\n',
            "$.sources.demo.type: Invalid value 'kafka'",
            id="unknown-type",
        ),
        pytest.param(
            '[sinks.crm]\ninputs = ["x"]\nurl = "http://x/"\n',
            "$.sinks.crm.type: missing (what kind of sink is this?)",
            id="sink-without-type",
        ),
        pytest.param(
            '[store]\nretention = "5 weeks"\n', "$.store.retention: invalid duration '5 weeks'", id="duration"
        ),
        pytest.param(
            "[store]\nretention = nan\n", "$.store.retention: invalid duration nan", id="nan-duration"
        ),
        pytest.param(
            '[store]\ndurability = "off"\n', "$.store.durability: Invalid enum value 'off'", id="enum"
        ),
        pytest.param('[listener]\nmax_body = "1.5MiB"\n', "$.listener.max_body: invalid size", id="size"),
        pytest.param(
            '[listener]\naddress = "localhost"\n',
            "$.listener.address: expected host:port, got 'localhost'",
            id="address-without-port",
        ),
        pytest.param(
            '[listener]\naddress = "127.0.0.1:99999"\n',
            "$.listener.address: expected host:port",
            id="port-range",
        ),
        pytest.param(
            '[listener]\naddress = "127.0.0.1:http"\n',
            "$.listener.address: expected host:port",
            id="port-name",
        ),
    ],
)
def test_section_errors_name_their_toml_path(text: str, expected: str) -> None:
    [problem] = problems(text)
    assert problem.startswith(expected), problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            '[transforms.t]\ninputs = ["nowhere"]\n',
            ["$.transforms.t.inputs[0]: unknown input 'nowhere'"],
            id="unknown-input",
        ),
        pytest.param(
            '[transforms.t]\ninputs = ["t"]\n',
            ["$.transforms.t.inputs[0]: a component cannot read its own output"],
            id="reads-itself",
        ),
        pytest.param(
            '[transforms.a]\ninputs = ["b"]\n'
            '[transforms.b]\ninputs = ["c"]\n'
            '[transforms.c]\ninputs = ["a"]\n',
            ["$.transforms.c.inputs: cycle a -> b -> c -> a"],
            id="cycle",
        ),
        pytest.param(
            PIPELINE + '[sinks.copy]\ntype = "file"\ninputs = ["crm"]\npath = "out.jsonl"\n',
            ["$.sinks.copy.inputs[0]: 'crm' is a sink; inputs must be sources or transforms"],
            id="sink-as-input",
        ),
        pytest.param(
            PIPELINE + '[transforms.more]\ninputs = ["demo", "demo"]\n',
            ["$.transforms.more.inputs: lists the same input twice"],
            id="same-input-twice",
        ),
        pytest.param(
            PIPELINE
            + '[transforms.extra]\ninputs = ["demo"]\n'
            + '[sinks.extra]\ntype = "file"\ninputs = ["shape"]\npath = "x"\n',
            ["$.sinks.extra: name already used by $.transforms.extra"],
            id="name-used-twice",
        ),
        pytest.param(
            '[sources.a]\ntype = "webhook"\npath = "/hooks/b"\n[sources.b]\ntype = "webhook"\n',
            ["$.sources.b.path: /hooks/b is already served by source 'a'"],
            id="duplicate-webhook-path",
        ),
        pytest.param(
            '[sources.a]\ntype = "webhook"\npath = "/healthz"\n',
            ["$.sources.a.path: /healthz is reserved"],
            id="reserved-path",
        ),
    ],
)
def test_wiring_errors_name_their_toml_path(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


@pytest.mark.parametrize("key", ["map", "filter"])
def test_invalid_jq_is_reported_with_jq_message(key: str) -> None:
    [problem] = problems(PIPELINE.replace('inputs = ["demo"]', f'inputs = ["demo"]\n{key} = ".a +"'))
    assert problem.startswith(f"$.transforms.shape.{key}: invalid jq program:")
    assert "syntax error" in problem


def test_every_decoding_error_is_reported_together() -> None:
    text = """
[bogus]
[store]
retention = "soon"
[listener]
max_body = "huge"
[sinks.crm]
type = "http"
inputs = ["demo"]
url = "http://x/"
colour = "red"
[sinks.log]
type = "file"
inputs = ["demo"]
path = "x"
retry = { max_attempts = "many" }
"""
    assert problems(text) == [
        "$.bogus: unknown section",
        "$.store.retention: invalid duration 'soon': use a number and ms, s, m, h or d (e.g. '500ms')",
        "$.listener.max_body: invalid size 'huge': use an integer and B, KiB, MiB, GiB, KB, MB or GB",
        "$.sinks.crm.colour: unknown key",
        "$.sinks.log.retry.max_attempts: Expected `int`, got `str`",
    ]


def test_every_wiring_error_is_reported_together() -> None:
    text = """
[listener]
address = "nowhere"
[sources.demo]
type = "webhook"
path = "/readyz"
[transforms.a]
inputs = ["b"]
map = "{"
[transforms.b]
inputs = ["a"]
[sinks.crm]
type = "file"
inputs = ["ghost"]
path = "x"
"""
    found = problems(text)
    assert found[0] == "$.sinks.crm.inputs[0]: unknown input 'ghost'"
    assert "$.transforms.b.inputs: cycle a -> b -> a" in found
    assert "$.sources.demo.path: /readyz is reserved" in found
    assert any(problem.startswith("$.transforms.a.map: invalid jq program") for problem in found)
    assert found[-1] == "$.listener.address: expected host:port, got 'nowhere'"
    assert len(found) == 5


def test_relative_paths_resolve_from_the_config_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc" / "ferry"
    folder.mkdir(parents=True)
    file = folder / "ferry.toml"
    file.write_text(
        PIPELINE
        + '[store]\npath = "var/ferry.db"\n[control]\nsocket = "/run/ferry/ferry.sock"\n'
        + '[sinks.archive]\ntype = "file"\ninputs = ["demo"]\npath = "../out/archive.jsonl"\n',
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)

    loaded = load("etc/ferry/ferry.toml")

    assert loaded.path == file
    assert loaded.config.store.path == str(folder / "var" / "ferry.db")
    assert loaded.config.control.socket == "/run/ferry/ferry.sock"
    archive = loaded.config.sinks["archive"]
    assert isinstance(archive, FileSinkConfig)
    assert Path(archive.path).resolve() == tmp_path / "etc" / "out" / "archive.jsonl"


def test_parse_without_a_folder_leaves_paths_as_written() -> None:
    assert parse('[store]\npath = "var/ferry.db"\n').store.path == "var/ferry.db"


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^\$: cannot read"):
        load(tmp_path / "missing.toml")


# -- the command line ---------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    file = tmp_path / "ferry.toml"
    file.write_text(text, encoding="utf-8")
    return str(file)


def test_check_accepts_a_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, DESIGN_SAMPLE)

    assert main(["check", "-c", path]) == 0

    out, err = capsys.readouterr()
    assert out == f"{path}: ok (1 source(s), 1 transform(s), 1 sink(s))\n"
    assert err == ""


def test_check_rejects_an_invalid_file_printing_each_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, PIPELINE + 'bogus = 1\n[transforms.more]\ninputs = ["ghost"]\n')

    assert main(["check", "-c", path]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}: invalid configuration (1 error(s))",
        "  $.sinks.crm.bogus: unknown key",
    ]


def test_check_reports_several_semantic_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[transforms.a]\ninputs = ["ghost"]\n[listener]\naddress = "x"\n')

    assert main(["check", "-c", path]) == 2

    err = capsys.readouterr().err
    assert f"{path}: invalid configuration (2 error(s))" in err
    assert "  $.transforms.a.inputs[0]: unknown input 'ghost'" in err
    assert "  $.listener.address: expected host:port, got 'x'" in err


def test_config_schema_prints_the_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-schema"]) == 0

    schema = json.loads(capsys.readouterr().out)
    config = schema["$defs"]["Config"]
    assert set(config["properties"]) == {
        "store",
        "cluster",
        "listener",
        "control",
        "supervisor",
        "telemetry",
        "sources",
        "transforms",
        "sinks",
        "rate_limits",
        "alerting",
        "alerts",
        "channels",
    }
    assert config["additionalProperties"] is False
    assert schema["$defs"]["RetryConfig"]["properties"]["initial_backoff"]["type"] == "string"


def test_run_refuses_an_invalid_file_without_creating_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[store]\npath = "state/ferry.db"\n' + PIPELINE + "bogus = 1\n")

    assert main(["run", "-c", path]) == 2

    assert "$.sinks.crm.bogus: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ferry.toml"]


def test_a_component_without_a_type_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse('[sources.demo]\nidempotency_header = "X"\n\n[sinks.out]\ninputs = ["demo"]\npath = "x"\n')
    assert "$.sources.demo.type: missing (what kind of source is this?)" in caught.value.problems
    assert "$.sinks.out.type: missing (what kind of sink is this?)" in caught.value.problems


def test_supervisor_backoff_bounds_are_checked() -> None:
    with pytest.raises(ConfigError) as caught:
        parse('[supervisor]\ninitial_backoff = "1m"\nmax_backoff = "1s"\n')
    assert caught.value.problems == ["$.supervisor.initial_backoff: larger than max_backoff"]


def test_the_store_backend_and_its_url_go_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_TEST_DB", "postgresql://127.0.0.1:5432/ferry")
    assert problems('[store]\nbackend = "postgres"\n') == [
        '$.store.url: required with backend = "postgres" (e.g. url = "env:FERRY_DATABASE_URL")'
    ]
    assert problems('[store]\nurl = "env:FERRY_TEST_DB"\n') == [
        '$.store.url: only for backend = "postgres"; SQLite uses `path` (remove url or set the backend)'
    ]
    assert problems('[store]\nbackend = "mysql"\n')[0].startswith("$.store.backend:")
    config = parse('[store]\nbackend = "postgres"\nurl = "env:FERRY_TEST_DB"\n')
    assert config.store.url is not None
    assert config.store.url.value.reveal() == "postgresql://127.0.0.1:5432/ferry"
    assert "127.0.0.1" not in repr(config.store)  # a secret reference: the URL never shows
    assert parse("").store.backend == "sqlite"


def test_a_missing_database_url_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FERRY_TEST_DB", raising=False)
    (problem,) = problems('[store]\nbackend = "postgres"\nurl = "env:FERRY_TEST_DB"\n')
    assert problem.startswith("$.store.url:")
    assert "FERRY_TEST_DB" in problem


def test_the_node_id_is_configured_or_the_host_and_listener_port() -> None:
    assert node_id(parse('[cluster]\nnode_id = "edge-1"\n')) == "edge-1"
    assert node_id(parse('[listener]\naddress = "0.0.0.0:8443"\n')) == f"{socket.gethostname()}:8443"
    assert node_id(parse('[listener]\naddress = "127.0.0.1:0"\n')) == f"{socket.gethostname()}:p{os.getpid()}"
    assert problems('[cluster]\nnode_id = ""\n')[0].startswith("$.cluster.node_id:")
