"""Every error ferry raises on purpose, as one tree.

    FerryError
    ├── ConfigError                 a config file is invalid (holds every problem found)
    ├── ActivationError             the sockets systemd passed (LISTEN_FDS) are described wrongly or unusable
    ├── StoreError                  the outbox cannot be used
    │   ├── StoreUnavailable        a write did not commit (disk full, I/O error, closed); webhooks answer 503
    │   ├── StoreCorrupt            the file is not a ferry database, or is damaged; startup refuses it
    │   │   └── SchemaMismatch      PostgreSQL: the database's schema is another ferry version's; exit 2
    │   └── StoreKeyMissing         rows are encrypted with a key that is not configured; startup refuses it
    ├── SupervisorError
    │   └── TooManyRestarts         actors crashed more than `max_restarts` in `window`; the daemon exits 1
    ├── ControlUnavailable          the control socket cannot be created (path taken, live daemon, bad group)
    ├── PollError                   one poll of an upstream API failed (kind: http_503, not_json, …); backoff
    └── DeliveryError               one delivery attempt failed
        ├── RetryableDelivery       408, 425, 429, 5xx, timeouts, transport errors: scheduled again
        │   └── DeliveryTimeout     no complete answer within the request's timeout
        └── PermanentDelivery       other 4xx, redirects, unusable URLs, a lookup answer that is
                                    not JSON: dead-lettered at once

A jq error is not in this tree: a transform's program returns it as a value
(`actors.transform.program.Failure`) and the transform dead-letters that one event
under its own stage; no exception is raised.

Foreign exceptions (sqlite3, h11, httpx, OSError) are translated into these at
the edge that meets them, so the rest of the code catches by level.
"""

from __future__ import annotations


class FerryError(Exception):
    """Base of every error ferry raises on purpose."""


class ConfigError(FerryError):
    """A config file is invalid; `problems` lists each one with its TOML path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ActivationError(FerryError):
    """The sockets systemd passed (`LISTEN_FDS`) are described wrongly or cannot be served."""


class StoreError(FerryError):
    """The outbox cannot be used."""


class StoreUnavailable(StoreError):
    """A write did not commit; nothing it carried was acknowledged."""


class StoreCorrupt(StoreError):
    """The database file is not ferry's or is damaged; it is left untouched."""


class SchemaMismatch(StoreCorrupt):
    """The database's schema is not the one this code writes (PostgreSQL, shared by nodes of
    several versions); the node refuses to start (exit 2) and changes nothing."""


class StoreKeyMissing(StoreError):
    """Payloads in the store need an encryption key the config does not give; nothing was changed."""


class SupervisorError(FerryError):
    """The supervisor gave up."""


class TooManyRestarts(SupervisorError):
    """Actors crashed more often than the restart policy allows."""


class ControlUnavailable(FerryError):
    """The control socket cannot be served; the daemon does not start without it."""


class DeliveryError(FerryError):
    """One delivery attempt failed. `status` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class RetryableDelivery(DeliveryError):
    """Worth trying again later (the receiver is overloaded, down or unreachable)."""


class DeliveryTimeout(RetryableDelivery):
    """No complete answer within the request's timeout (an overload signal for adaptive concurrency)."""


class PermanentDelivery(DeliveryError):
    """Trying again cannot help; the delivery goes to the dead-letter queue."""


class PollError(FerryError):
    """One poll of an upstream API failed; the poller backs off and tries again.

    `kind` is the short name counted and shown (`http_503`, `timeout`, `not_json`,
    `bad_shape`, `no_key`, `bad_mark`, `stuck_cursor`, `job_timeout`, …); `retry_after`
    is the server's `Retry-After`, a floor for the backoff.
    """

    def __init__(self, message: str, *, kind: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after
