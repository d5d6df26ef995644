"""The shipped config.toml runs a complete pipeline, and its file sink writes each event exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import trio

from tests.fakes import ROOT, Daemon


async def test_shipped_config_delivers_every_event_once_to_the_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    text = (ROOT / "config.toml").read_text()
    assert 'address = "127.0.0.1:8080"' in text
    config.write_text(text.replace("127.0.0.1:8080", "127.0.0.1:0"))
    daemon = Daemon(config, tmp_path / "ferry.log").start()
    out = tmp_path / "var" / "demo-out.jsonl"
    try:
        async with httpx.AsyncClient(base_url=daemon.url, timeout=10) as client:

            async def post(start: int) -> None:
                for n in range(start, 2000, 20):
                    body = {"id": n, "first": "Ada", "last": "Lovelace"}
                    response = await client.post("/hooks/demo", json=body)
                    assert response.status_code == 202

            async with trio.open_nursery() as nursery:
                for start in range(20):
                    nursery.start_soon(post, start)
        with trio.fail_after(30):
            while not out.exists() or sum(1 for _ in out.open()) < 2000:
                await trio.sleep(0.05)
    finally:
        daemon.stop()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2000, "the file sink wrote a delivery twice"
    assert sorted(line["event"]["id"] for line in lines) == list(range(2000))
    assert lines[0]["event"]["name"] == "Ada Lovelace"
    assert len({line["id"] for line in lines}) == 2000
