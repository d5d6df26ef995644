"""Cluster mode: this node's heartbeat and leases, singletons under fenced leases, cluster-wide control."""
