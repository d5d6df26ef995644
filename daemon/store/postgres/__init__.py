"""The PostgreSQL backend of the store (issue 15): several ferry nodes share one outbox."""
