"""Admission limits: rate budgets, circuit breakers, adaptive concurrency, backoff schedules."""
