"""Config of limits: rate_limit names, url/urls, adaptive bounds, breakers; bad values named by path."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.sink.config import HttpSinkConfig
from daemon.cli.ferry import main
from daemon.config.limits import AdaptiveConfig, BreakerConfig
from daemon.config.root import parse
from daemon.errors import ConfigError

BASE = """
[sources.s]
type = "webhook"
[sinks.out]
type = "http"
inputs = ["s"]
"""


def sink(extra: str) -> HttpSinkConfig:
    config = parse(BASE + extra)
    out = config.sinks["out"]
    assert isinstance(out, HttpSinkConfig)
    return out


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.problems


def test_one_url_has_no_breaker_unless_asked_and_several_get_the_default_one() -> None:
    single = sink('url = "http://a.test/x"\n')
    assert (single.targets, single.breaker_policy, single.max_concurrency) == (["http://a.test/x"], None, 8)
    failover = sink('urls = ["http://a.test/x", "http://b.test/x"]\n')
    assert failover.targets == ["http://a.test/x", "http://b.test/x"]
    assert failover.breaker_policy == BreakerConfig()
    asked = sink('url = "http://a.test/x"\nbreaker = { failures = 2, cool_down = "5s" }\n')
    assert asked.breaker_policy == BreakerConfig(failures=2, cool_down=5.0)  # type: ignore[arg-type]


def test_adaptive_concurrency_uses_its_ceiling_as_the_most_in_flight() -> None:
    adaptive = sink(
        'url = "http://a.test/x"\nconcurrency = "adaptive"\nadaptive = { floor = 2, ceiling = 40 }\n'
    )
    assert adaptive.concurrency == "adaptive"
    assert adaptive.adaptive == AdaptiveConfig(floor=2, ceiling=40)
    assert adaptive.max_concurrency == 40


URL = 'url = "http://a.test/x"\n'


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("", "$.sinks.out.url: give either `url` or `urls` (a list), not both or neither"),
        (URL + 'urls = ["http://b.test/x"]\n', "$.sinks.out.url: give either `url` or `urls`"),
        ('urls = ["http://a.test/x", "http://a.test/x"]\n', "$.sinks.out.urls: lists the same URL twice"),
        ('urls = ["ftp://a.test/x"]\n', "$.sinks.out.urls[0]: Expected `str` matching regex"),
        (URL + 'concurrency = "fast"\n', "$.sinks.out.concurrency: Invalid enum value 'fast'"),
        (URL + "concurrency = 0\n", "$.sinks.out.concurrency: Expected"),
        (URL + "adaptive = { floor = 10, ceiling = 5 }\n", "$.sinks.out.adaptive.floor: larger than ceiling"),
        (
            URL + "adaptive = { initial = 99, ceiling = 5 }\n",
            "$.sinks.out.adaptive.initial: outside floor..ceiling",
        ),
        (URL + "adaptive = { backoff = 1.5 }\n", "$.sinks.out.adaptive.backoff: Expected `float` < 1"),
        (URL + "adaptive = { tolerance = 0.5 }\n", "$.sinks.out.adaptive.tolerance: Expected `float` >= 1"),
        (URL + 'breaker = { cool_down = "0s" }\n', "$.sinks.out.breaker.cool_down: must be more than 0s"),
        (URL + 'breaker = { window = "0s" }\n', "$.sinks.out.breaker.window: must be more than 0s"),
        (URL + "breaker = { failures = 0 }\n", "$.sinks.out.breaker.failures: Expected `int` >= 1"),
        (URL + "breaker = { rate = 1.5 }\n", "$.sinks.out.breaker.rate: Expected `float` <= 1"),
        (URL + "breaker = { trip = 3 }\n", "$.sinks.out.breaker.trip: unknown key"),
        (
            URL + 'rate_limit = "api"\n',
            "$.sinks.out.rate_limit: unknown rate limit 'api' (known: none configured)",
        ),
        (
            URL + 'rate_limit = "api"\n[rate_limits.other]\nrate = 1\n',
            "$.sinks.out.rate_limit: unknown rate limit 'api' (known: other)",
        ),
    ],
)
def test_bad_limit_settings_are_rejected_with_their_path(extra: str, expected: str) -> None:
    found = problems(BASE + extra)
    assert any(problem.startswith(expected) for problem in found), found


def test_ferry_check_names_every_bad_limit_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text(
        BASE
        + URL
        + 'rate_limit = "nope"\nbreaker = { cool_down = "0s" }\n[rate_limits.api]\nrate = 5\nper = "0s"\n'
    )
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "$.rate_limits.api.per: must be more than 0s" in err
    assert "$.sinks.out.rate_limit: unknown rate limit 'nope' (known: api)" in err
    assert "$.sinks.out.breaker.cool_down: must be more than 0s" in err
