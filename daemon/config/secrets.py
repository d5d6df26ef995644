"""Secrets in the config: references resolved when the config is loaded, values never shown.

A secret in the config file is a string in one of these forms:

    env:NAME            the environment variable NAME
    file:PATH           the contents of a file (relative paths resolve from the config's folder)
    credential:NAME     `$CREDENTIALS_DIRECTORY/NAME`, a systemd credential (`LoadCredential=`,
                        `LoadCredentialEncrypted=`, `SetCredential=`)
    anything else       a literal: accepted, but `ferry check` and `ferry run` warn about it

One trailing newline (`\\n` or `\\r\\n`) of a file or credential is dropped, since editors and
`echo` add one. An empty value, a missing variable, an unreadable file or a credential with no
`$CREDENTIALS_DIRECTORY` is a config error naming the TOML path and the reference, never a value.

Resolution:
    `daemon.config.root.load()` decodes every `SecretRef` in the config and then binds it: it reads
    the value once, keeps it as a `Secret` inside the reference, and reports every reference it
    could not read. `ferry ctl` loads the config only to find its socket and does not read
    secrets (`load(..., secrets=False)`), so an operator needs no access to them.

Rotation:
    A reload (`ferry ctl reload`, SIGHUP) loads the file again, so every reference is read
    again. A reference compares equal to another only if the text *and* the value are the
    same, so a component whose secret changed (a rotated file or credential) counts as changed
    and is rebuilt with the new value; one whose secrets did not change keeps running.

Never shown:
    `Secret` has no way to print its value: `repr`, `str`, `format` and f-strings give `***`,
    pickling refuses, msgspec cannot encode it; `reveal()` is the one way to the value and is
    called only where the value is used (a signature check, an outgoing header). A literal
    `SecretRef`'s repr hides the literal too. Every bound value is also given to the log
    redactor (`values(config)`), which replaces it with `***` in any log line.
"""

from __future__ import annotations

import hmac
import os
import secrets as _random
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any, Final, Literal, NoReturn, final

import msgspec

from daemon.errors import ConfigError

__all__ = ["Secret", "SecretRef", "bind", "literal_paths", "resolve", "values"]

Kind = Literal["env", "file", "credential", "literal"]
MASKED: Final = "***"
MAX_FILE_BYTES: Final = 1024 * 1024
_PREFIXES: Final[tuple[Kind, ...]] = ("env", "file", "credential")
_FINGERPRINT_KEY: Final = _random.token_bytes(32)  # per process: a fingerprint means nothing elsewhere
_CREDENTIAL_NAME: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-@:")


@final
class Secret:
    """A secret value that does not show itself: `reveal()` is the only way to it.

    Equality is constant-time (`hmac.compare_digest`); a `Secret` is not hashable, so it cannot
    end up as a dict key that some debug output prints.
    """

    __slots__ = ("_value",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The value itself. Use it, never log it."""
        return self._value

    def reveal_bytes(self) -> bytes:
        """The value as UTF-8 bytes (for HMAC keys)."""
        return self._value.encode()

    def __repr__(self) -> str:
        return f"Secret({MASKED!r})"

    def __str__(self) -> str:
        return MASKED

    def __format__(self, spec: str) -> str:
        return MASKED

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")


@final
class SecretRef:
    """A secret as written in the config (`env:NAME`, `file:PATH`, `credential:NAME` or a literal).

    `value` is the `Secret` read when the config was loaded. Two references are equal when their
    text and their values are equal (see "Rotation" in the module docstring).
    """

    __slots__ = ("_fingerprint", "_secret", "kind", "target")

    def __init__(self, text: str) -> None:
        kind, sep, rest = text.partition(":")
        if sep and kind in _PREFIXES:
            if not rest:
                raise ValueError(f"{kind}: needs a name after the colon, e.g. {kind}:NAME")
            self.kind: Kind = kind
            self.target = rest
        else:
            self.kind, self.target = "literal", text
        if self.kind == "credential" and not set(rest) <= _CREDENTIAL_NAME:
            raise ValueError(f"credential:{rest!r}: a credential name has no '/' or spaces")
        self._secret: Secret | None = None
        self._fingerprint = b""

    @classmethod
    def parse(cls, value: object) -> SecretRef:
        """Decode a config value (msgspec `dec_hook`)."""
        if not isinstance(value, str):
            kind = type(value).__name__
            raise TypeError(f"expected a secret reference (env:NAME, file:PATH, credential:NAME), got {kind}")
        if not value:
            raise ValueError("a secret cannot be empty")
        return cls(value)

    @property
    def text(self) -> str:
        """The reference as written, with a literal's value hidden."""
        return MASKED if self.kind == "literal" else f"{self.kind}:{self.target}"

    @property
    def value(self) -> Secret:
        """The value read when the config was loaded (read now if it never was)."""
        if self._secret is None:
            self.bind(resolve(self))
        assert self._secret is not None
        return self._secret

    @property
    def bound(self) -> bool:
        return self._secret is not None

    def bind(self, secret: Secret) -> None:
        """Keep `secret` as this reference's value (done by `bind()` when a config is loaded)."""
        self._secret = secret
        self._fingerprint = hmac.new(_FINGERPRINT_KEY, secret.reveal_bytes(), sha256).digest()

    def __repr__(self) -> str:
        return f"SecretRef({self.text!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretRef):
            return NotImplemented
        return (self.kind, self.target, self._fingerprint) == (other.kind, other.target, other._fingerprint)

    def __hash__(self) -> int:
        return hash((self.kind, self.target))

    def __reduce__(self) -> NoReturn:
        raise TypeError("a SecretRef cannot be pickled")


def resolve(ref: SecretRef | str, *, base_dir: Path | None = None) -> Secret:
    """Read a reference's value now; `ConfigError` naming the reference (never a value) if it cannot be.

    `base_dir` is where a relative `file:` path starts (default: the working directory).
    """
    if isinstance(ref, str):
        ref = SecretRef(ref)
    if ref.kind == "literal":
        return Secret(ref.target)
    if ref.kind == "env":
        value = os.environ.get(ref.target)
        if value is None:
            _fail(ref, f"environment variable {ref.target} is not set")
    else:
        if ref.kind == "credential":
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                _fail(ref, "$CREDENTIALS_DIRECTORY is not set (systemd sets it for LoadCredential=)")
            path = Path(directory) / ref.target
        else:
            path = Path(ref.target).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
        value = _read(ref, path)
    if not value:
        _fail(ref, "is empty")
    return Secret(value)


def _read(ref: SecretRef, path: Path) -> str:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        _fail(ref, f"cannot read {path}: {exc.strerror or type(exc).__name__}")
    if len(data) > MAX_FILE_BYTES:
        _fail(ref, f"{path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        _fail(ref, f"{path} is not UTF-8 text")
    return text.removesuffix("\n").removesuffix("\r")


def _fail(ref: SecretRef, reason: str) -> NoReturn:
    raise ConfigError([f"{ref.text}: {reason}"])


def walk(value: Any, path: str = "$") -> Iterator[tuple[str, SecretRef]]:
    """Every `SecretRef` inside a config value (Structs, tables, lists), with its TOML path."""
    if isinstance(value, SecretRef):
        yield path, value
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            yield from walk(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from walk(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from walk(item, f"{path}[{index}]")


def bind(config: Any, *, base_dir: Path | None = None) -> list[str]:
    """Read every secret the config references; the problems found, each with its TOML path."""
    problems: list[str] = []
    for path, ref in walk(config):
        try:
            ref.bind(resolve(ref, base_dir=base_dir))
        except ConfigError as exc:
            problems.extend(f"{path}: {problem}" for problem in exc.problems)
    return problems


def literal_paths(config: Any) -> list[str]:
    """The TOML paths holding a literal secret (what `ferry check` warns about)."""
    return [path for path, ref in walk(config) if ref.kind == "literal"]


def values(config: Any) -> list[str]:
    """Every bound secret value, for the log redactor (never for display)."""
    return [ref.value.reveal() for _, ref in walk(config) if ref.bound]


def schema() -> dict[str, Any]:
    """The JSON Schema of a secret reference."""
    return {
        "type": "string",
        "minLength": 1,
        "description": "secret: env:NAME, file:PATH, credential:NAME (a literal is accepted with a warning)",
    }
