"""Sinks: the delivery actor, its admission guard, outcome grouping, and the http and file senders."""
