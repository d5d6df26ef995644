"""The webhook source: the h11 listener, its connections, signature verification, ingest batching."""
