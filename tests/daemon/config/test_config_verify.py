"""`[sources.NAME.verify]` and secret references in the config: every bad input is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.webhook.config import WebhookSourceConfig
from daemon.cli.ferry import main
from daemon.config.root import load, parse
from daemon.errors import ConfigError

SECRET_VALUE = "do-not-print-me-0123456789"


def _errors(verify: str, tmp_path: Path) -> list[str]:
    text = f'[sources.hook]\ntype = "webhook"\nverify = {verify}\n'
    with pytest.raises(ConfigError) as caught:
        parse(text, base_dir=tmp_path)
    return caught.value.problems


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", SECRET_VALUE)
    monkeypatch.delenv("HOOK_UNSET", raising=False)


@pytest.mark.parametrize(
    ("verify", "expected"),
    [
        (
            '{ scheme = "hmac", secrets = ["env:HOOK_SECRET"], header = "X-Sig", signed = "{ts}.{body}" }',
            "$.sources.hook.verify.signed: unknown field(s) ts; use {body}, {timestamp}, {id}",
        ),
        (
            '{ scheme = "hmac", secrets = ["env:HOOK_SECRET"], header = "X-Sig", signed = "{timestamp}" , '
            'timestamp_header = "X-T" }',
            "$.sources.hook.verify.signed: must include {body}",
        ),
        (
            '{ scheme = "hmac", secrets = ["env:HOOK_SECRET"], header = "X-Sig", '
            'signed = "{timestamp}.{body}" }',
            "$.sources.hook.verify.signed: uses {timestamp} but timestamp_header is not set",
        ),
        (
            '{ scheme = "hmac", secrets = ["env:HOOK_SECRET"], header = "X-Sig", timestamp_header = "X-T" }',
            "$.sources.hook.verify.timestamp_header: set, but `signed` does not include {timestamp}",
        ),
        (
            '{ scheme = "hmac", secrets = ["env:HOOK_SECRET"], header = "X-Sig", id_header = "X-Id" }',
            "$.sources.hook.verify.id_header: set, but `signed` does not include {id}",
        ),
        (
            '{ scheme = "hmac", secrets = ["env:HOOK_SECRET"], header = "X-Sig", signed = "{body" }',
            "$.sources.hook.verify.signed: invalid template: ",
        ),
        (
            '{ scheme = "hmac", secrets = ["env:HOOK_SECRET"], header = "X Sig" }',
            "$.sources.hook.verify.header: ",
        ),
        (
            '{ scheme = "github", secrets = [] }',
            "$.sources.hook.verify.secrets: Expected `array` of length >= 1",
        ),
        (
            '{ scheme = "gitlab", secrets = ["env:HOOK_SECRET"] }',
            "$.sources.hook.verify.scheme: Invalid value 'gitlab'",
        ),
        ('{ scheme = "github", secret = "env:HOOK_SECRET" }', "$.sources.hook.verify.secret: unknown key"),
        ('{ scheme = "jwt", algorithms = ["HS256"] }', "$.sources.hook.verify: give keys or jwks_file"),
        (
            '{ scheme = "jwt", algorithms = ["HS256", "RS256"], keys = ["env:HOOK_SECRET"] }',
            "$.sources.hook.verify.algorithms: do not mix HS* (shared secret) with public-key algorithms",
        ),
        (
            '{ scheme = "jwt", algorithms = ["none"], keys = ["env:HOOK_SECRET"] }',
            "$.sources.hook.verify.algorithms",
        ),
        (
            '{ scheme = "jwt", algorithms = ["RS256"], keys = ["env:HOOK_SECRET"] }',
            "$.sources.hook.verify.keys[0]: env:HOOK_SECRET is not a key for RS256",
        ),
        (
            '{ scheme = "jwt", algorithms = ["RS256"], jwks_file = "missing.json" }',
            "$.sources.hook.verify.jwks_file: cannot read ",
        ),
        (
            '{ scheme = "standard-webhooks", secrets = ["env:HOOK_SECRET"] }',
            "$.sources.hook.verify.secrets[0]: a standard-webhooks secret is whsec_<base64>",
        ),
        (
            '{ scheme = "github", secrets = ["env:HOOK_SECRET", "env:HOOK_UNSET"] }',
            "$.sources.hook.verify.secrets[1]: env:HOOK_UNSET: environment variable HOOK_UNSET is not set",
        ),
        (
            '{ scheme = "basic", username = "u", secrets = ["file:nowhere/pw"] }',
            "$.sources.hook.verify.secrets[0]: file:nowhere/pw: cannot read ",
        ),
    ],
)
def test_bad_verify_tables_are_refused_with_their_path(verify: str, expected: str, tmp_path: Path) -> None:
    problems = _errors(verify, tmp_path)
    assert any(problem.startswith(expected) for problem in problems), problems
    assert all(SECRET_VALUE not in problem for problem in problems)


def test_a_jwks_file_that_is_not_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text('{"keys": "nope"}')
    problems = _errors('{ scheme = "jwt", algorithms = ["RS256"], jwks_file = "jwks.json" }', tmp_path)
    assert problems[0].startswith("$.sources.hook.verify.jwks_file: not a usable JWKS"), problems


def test_ferry_check_warns_about_literal_secrets_and_names_no_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text(
        f'[sources.hook]\ntype = "webhook"\nverify = {{ scheme = "github", secrets = ["{SECRET_VALUE}"] }}\n'
    )
    assert main(["check", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "ok (1 source(s)" in out
    assert "warning: $.sources.hook.verify.secrets[0]: a literal secret in the config file" in err
    assert SECRET_VALUE not in out + err


def test_ferry_check_fails_on_an_unreadable_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text(
        '[sources.hook]\ntype = "webhook"\nverify = { scheme = "github", secrets = ["env:HOOK_UNSET"] }\n'
    )
    assert main(["check", "-c", str(path)]) == 2
    assert "env:HOOK_UNSET: environment variable HOOK_UNSET is not set" in capsys.readouterr().err


def test_ctl_reads_the_config_without_reading_secrets(tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text(
        '[sources.hook]\ntype = "webhook"\nverify = { scheme = "github", secrets = ["credential:gh"] }\n'
    )
    with pytest.raises(ConfigError):
        load(path)
    loaded = load(path, read_secrets=False)
    source = loaded.config.sources["hook"]
    assert isinstance(source, WebhookSourceConfig)
    assert source.verify is not None


def test_a_relative_jwks_file_resolves_from_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "jwks.json").write_text('{"keys": []}')
    config = parse(
        '[sources.hook]\ntype = "webhook"\n'
        'verify = { scheme = "jwt", algorithms = ["RS256"], jwks_file = "keys/jwks.json" }\n',
        base_dir=tmp_path,
        read_secrets=False,
    )
    source = config.sources["hook"]
    assert isinstance(source, WebhookSourceConfig)
    verify = source.verify
    assert verify is not None
    assert getattr(verify, "jwks_file", None) == str(tmp_path / "keys" / "jwks.json")
