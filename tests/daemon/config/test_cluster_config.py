"""`[cluster]` timings are checked at load: a lease must outlive a late heartbeat (docs/cluster.md)."""

from __future__ import annotations

import pytest

from daemon.config.root import parse
from daemon.errors import ConfigError


def test_the_defaults_fail_over_within_ten_seconds() -> None:
    cluster = parse("").cluster
    assert cluster.lease_ttl + cluster.heartbeat <= 10
    assert cluster.database_timeout < cluster.lease_ttl


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ('heartbeat = "2s"\nlease_ttl = "5s"', "lease_ttl (5s) must be at least 3 heartbeats (6s)"),
        ('heartbeat = "0s"', "heartbeat must be more than 0s"),
        (
            'lease_ttl = "6s"\ndatabase_timeout = "6s"',
            "database_timeout must be more than 0s and less than lease_ttl",
        ),
        ('database_timeout = "0s"', "database_timeout must be more than 0s"),
        ('lease_ttl = "soon"', "invalid duration 'soon'"),
        ("heartbeats = 1", "$.cluster.heartbeats: unknown key"),
    ],
)
def test_bad_timings_are_refused_with_their_path(table: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(f"[cluster]\n{table}\n")
    (message,) = caught.value.problems
    assert message.startswith("$.cluster")
    assert problem in message


CLUSTER_SINK = """
[store]
backend = "{backend}"
{url}

[cluster]
delivery_lease = "{lease}"

[sources.hooks]
type = "webhook"

[sinks.crm]
type = "http"
inputs = ["hooks"]
url = "https://crm.example.com/contacts"
timeout = "{timeout}"
"""


def test_a_sink_timeout_as_long_as_the_delivery_lease_is_refused_in_a_cluster() -> None:
    url = 'url = "postgresql://127.0.0.1/ferry"'
    with pytest.raises(ConfigError) as caught:
        parse(CLUSTER_SINK.format(backend="postgres", url=url, lease="60s", timeout="60s"))
    (message,) = caught.value.problems
    assert message.startswith("$.sinks.crm.timeout: 60s is not less than [cluster] delivery_lease (60s)")
    assert parse(CLUSTER_SINK.format(backend="postgres", url=url, lease="60s", timeout="59s"))
    # One SQLite node claims nothing: no lease to outlast.
    assert parse(CLUSTER_SINK.format(backend="sqlite", url="", lease="60s", timeout="90s"))
