"""Transforms: the transformer and aggregator actors, the jq program, enrichment, event schemas."""
