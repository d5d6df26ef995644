"""Outbound HTTP: the lean client, authentication, token sources."""
