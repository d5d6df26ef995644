"""Secret references: env/file/credential/literal, errors that name the reference, values never shown."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import msgspec
import pytest

from daemon.config import secrets
from daemon.config.base import Section
from daemon.config.secrets import Secret, SecretRef, resolve
from daemon.config.units import dec_hook
from daemon.errors import ConfigError

VALUE = "s3cr3t-VALUE-never-shown"


class _Holder(Section, frozen=True):
    key: SecretRef
    more: list[SecretRef] = []
    table: dict[str, SecretRef] = {}


def _decode(raw: dict[str, object]) -> _Holder:
    return msgspec.convert(raw, _Holder, dec_hook=dec_hook)


def test_env_reference_reads_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRY_TEST_SECRET", VALUE)
    assert resolve("env:FERRY_TEST_SECRET").reveal() == VALUE


def test_file_reference_reads_the_file_drops_one_trailing_newline_and_resolves_relative(
    tmp_path: Path,
) -> None:
    (tmp_path / "key").write_text(VALUE + "\n")
    assert resolve(f"file:{tmp_path / 'key'}").reveal() == VALUE
    assert resolve("file:key", base_dir=tmp_path).reveal() == VALUE
    (tmp_path / "crlf").write_bytes(b"abc\r\n")
    assert resolve(f"file:{tmp_path / 'crlf'}").reveal() == "abc"
    (tmp_path / "two").write_text("abc\n\n")
    assert resolve(f"file:{tmp_path / 'two'}").reveal() == "abc\n"


def test_credential_reference_reads_from_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hook.key").write_text(VALUE)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert resolve("credential:hook.key").reveal() == VALUE


def test_anything_else_is_a_literal() -> None:
    assert resolve("whsec_abc").reveal() == "whsec_abc"
    assert resolve("https://x").reveal() == "https://x"
    assert SecretRef("https://x").kind == "literal"


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("env:FERRY_TEST_UNSET", "env:FERRY_TEST_UNSET: environment variable FERRY_TEST_UNSET is not set"),
        ("env:FERRY_TEST_EMPTY", "env:FERRY_TEST_EMPTY: is empty"),
        ("file:/nonexistent/ferry-key", "file:/nonexistent/ferry-key: cannot read /nonexistent/ferry-key: "),
        ("credential:hook", "credential:hook: $CREDENTIALS_DIRECTORY is not set"),
    ],
)
def test_unresolvable_reference_is_a_config_error_naming_it(
    ref: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FERRY_TEST_UNSET", raising=False)
    monkeypatch.setenv("FERRY_TEST_EMPTY", "")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError) as caught:
        resolve(ref)
    assert caught.value.problems[0].startswith(expected)


def test_unreadable_and_binary_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "bin").write_bytes(b"\xff\xfe" + VALUE.encode())
    with pytest.raises(ConfigError, match="is not UTF-8 text") as caught:
        resolve(f"file:{tmp_path / 'bin'}")
    assert VALUE not in str(caught.value)
    with pytest.raises(ConfigError, match=r"cannot read .*Is a directory"):
        resolve(f"file:{tmp_path}")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "a secret cannot be empty"),
        ("env:", "env: needs a name"),
        ("credential:../etc/passwd", "a credential name has no '/'"),
        (42, "expected a secret reference"),
    ],
)
def test_malformed_references_are_refused_when_decoded(raw: object, message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        _decode({"key": raw})


def test_a_secret_never_shows_its_value(caplog: pytest.LogCaptureFixture) -> None:
    secret = Secret(VALUE)
    shown = [repr(secret), str(secret), f"{secret}", f"{secret!r}", f"{secret:>40}"]
    assert all(VALUE not in text for text in shown)
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    with pytest.raises(TypeError):
        msgspec.json.encode({"k": secret})
    with pytest.raises(TypeError):
        hash(secret)
    logging.getLogger("ferry.test").warning("value %s %r", secret, {"k": secret})
    assert VALUE not in caplog.text
    assert secret == Secret(VALUE)
    assert secret != Secret(VALUE + "x")


def test_a_literal_reference_hides_its_literal_but_shows_other_references() -> None:
    literal, env = SecretRef(VALUE), SecretRef("env:HOOK_SECRET")
    assert VALUE not in repr(literal)
    assert VALUE not in str(literal)
    assert VALUE not in repr(_decode({"key": VALUE}))
    assert repr(env) == "SecretRef('env:HOOK_SECRET')"
    with pytest.raises(TypeError):
        pickle.dumps(literal)


def test_bind_reads_every_reference_and_reports_each_problem_with_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FERRY_TEST_SECRET", VALUE)
    monkeypatch.delenv("FERRY_TEST_UNSET", raising=False)
    (tmp_path / "k").write_text("from-file")
    holder = _decode(
        {"key": "env:FERRY_TEST_SECRET", "more": ["file:k", "env:FERRY_TEST_UNSET"], "table": {"a": "lit"}}
    )
    problems = secrets.bind(holder, base_dir=tmp_path)
    assert problems == ["$.more[1]: env:FERRY_TEST_UNSET: environment variable FERRY_TEST_UNSET is not set"]
    assert holder.key.value.reveal() == VALUE
    assert holder.more[0].value.reveal() == "from-file"
    assert secrets.literal_paths(holder) == ["$.table.a"]
    assert sorted(secrets.values(holder)) == sorted([VALUE, "from-file", "lit"])


def test_references_are_equal_only_with_the_same_text_and_value(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("one")
    before, same, rotated = (_decode({"key": f"file:{key}"}) for _ in range(3))
    secrets.bind(before)
    secrets.bind(same)
    key.write_text("two")
    secrets.bind(rotated)
    assert before == same
    assert before != rotated
    assert hash(before.key) == hash(rotated.key)
    assert rotated.key.value.reveal() == "two"
