"""The errors every step raises on purpose, each with a message a person can read on the row.

    WaifuError                 base: raised on purpose, message fit for a row's `reason`
    ├── Refused                final for this input: the row ends `failed` with the message, never retried
    │   └── DeepPagination     the API refuses a `pid` this deep: walk back with `id:<N` instead
    ├── Retryable              worth another try later: 429, 5xx, network trouble, truncated or
    │                          malformed body. `retry_after` is the wait the server asked for (capped),
    │                          else the caller's backoff decides
    └── Unavailable            the machine's fault, not the input's: a detector model missing, the rate
        └── DetectorUnavailable limiter's Redis down. The row waits (it is neither failed nor retried at
                               once); the message says how to fix the machine

Database trouble (SQLite "database is locked", a PostgreSQL serialization failure, a lost connection) is
not one of these: `db.engine.is_transient` tells it apart, and the task shell retries it with backoff.
"""

from __future__ import annotations


class WaifuError(Exception):
    """Base of every error raised on purpose; `str(exc)` is meant for a person."""


class Refused(WaifuError):
    """Final for this input (bad image, md5 mismatch, off-site redirect, HTTP 404...)."""


class DeepPagination(Refused):
    """The API refuses `pid` values this deep; walk back with `id:<N` instead."""


class Retryable(WaifuError):
    """Worth another try (429, 5xx, network trouble, truncated or malformed body)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # what the server asked for (already capped), else None


class Unavailable(WaifuError):
    """The machine cannot do this now (missing model file, limiter down); the input is not to blame."""


class DetectorUnavailable(Unavailable):
    """A detector cannot run here (missing model file, wrong library build); says how to fix it."""
