"""The errors every step raises on purpose, each with a message a person can read on the row.

Design notes: docs/architecture.md, `core/errors.py`.
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
