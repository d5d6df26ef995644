"""The configuration reference in docs/ is generated from the config structs and must not go stale."""

from __future__ import annotations

from pathlib import Path

from actors.sink.config import HttpSinkConfig, RetryConfig
from actors.webhook.config import ListenerConfig
from daemon.cli.config_docs import render
from daemon.config.sections import StoreConfig

DOCS = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_configuration_reference_matches_the_config_structs() -> None:
    assert DOCS.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is stale; regenerate it with "
        "`.venv/bin/ferry config-docs -o docs/configuration.md`"
    )


def test_configuration_reference_documents_every_key() -> None:
    text = render()
    for struct in (StoreConfig, ListenerConfig, RetryConfig, HttpSinkConfig):
        for name in struct.__struct_fields__:
            if name != "type":
                assert f"| `{name}` |" in text, f"{struct.__name__}.{name} is missing from the reference"
    assert '| `retention` | duration | `"3600s"` |' in text
    assert "| `max_body` | size | `1048576` |" in text
