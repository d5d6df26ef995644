"""Alerting: the alerter actor, rule expressions and state machine, notifiers, its config."""
