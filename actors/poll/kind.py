"""The poll source's registration: `[sources.NAME] type = "poll"` (config in `actors.poll.config`)."""

from __future__ import annotations

from typing import Final

from actors.poll.config import PollSourceConfig
from actors.poll.poller import Poller
from daemon.component import Deps, Kind, Wiring


def poller(name: str, config: PollSourceConfig, deps: Deps, wiring: Wiring) -> Poller:
    """A poller whose events go to `wiring`'s transforms and sinks."""
    return Poller(
        name,
        config,
        deps.store,
        sinks=list(wiring.sinks),
        consumers=[*wiring.transforms, *wiring.sinks],
        dedup_window=deps.dedup_window,
        limiter=deps.rate_limits.limiter(config.rate_limit),
        taps=deps.taps,
        redaction=deps.redaction,
        clock=deps.clock,
    )


POLL_SOURCE: Final = Kind("poll", PollSourceConfig, poller)
