"""The transform's registration (`[transforms.NAME]`, untagged; config in `actors.transform.config`)."""

from __future__ import annotations

from typing import Final

from actors.transform.aggregator import Aggregator
from actors.transform.config import TransformConfig
from actors.transform.enricher import Enricher
from actors.transform.transformer import Transformer
from daemon.component import Deps, Kind, Wiring


def transform(name: str, config: TransformConfig, deps: Deps, wiring: Wiring) -> Transformer | Aggregator:
    """An `Aggregator` when the transform has `aggregate`, else a `Transformer` (with its `Enricher`
    when it has `enrich`)."""
    transforms, sinks = list(wiring.transforms), list(wiring.sinks)
    if config.aggregate is not None:
        return Aggregator(
            name,
            config,
            deps.store,
            transforms=transforms,
            sinks=sinks,
            clock=deps.clock,
            taps=deps.taps,
            redaction=deps.redaction,
        )
    enrich = config.enrich
    enricher = (
        Enricher(name, enrich, limiter=deps.rate_limits.limiter(enrich.rate_limit), store=deps.store)
        if enrich is not None
        else None
    )
    return Transformer(
        name,
        config,
        deps.store,
        transforms=transforms,
        sinks=sinks,
        enricher=enricher,
        quarantine_after=deps.quarantine_after,
        clock=deps.clock,
        taps=deps.taps,
        redaction=deps.redaction,
    )


TRANSFORM: Final = Kind("", TransformConfig, transform)
