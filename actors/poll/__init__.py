"""The poll source: the poller actor, its pure paging and watermark parts, its config."""
