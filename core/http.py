"""The one HTTP policy of every outgoing request, API listing and file download alike: who we say we
are, how long we wait, how a status code is classified, and how long a `Retry-After` may make us wait."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

from core.errors import Refused, Retryable

# Booru admins block anonymous scrapers first: say who we are and where to read about us
USER_AGENT = "waifu-collector/0.2 (+https://github.com/waifu-collector/waifu)"


def parse_retry_after(value: str | None, cap: float) -> float | None:
    """Seconds to wait from a `Retry-After` header (seconds or an HTTP date), never more than `cap`
    (a server asking for a day must not park a worker for a day); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return None
    return max(0.0, min(seconds, cap))


def check_status(
    status: int, reason: str, retry_after: str | None, cap: float, what: str = "", subject: str = "file"
) -> None:
    """Raises for anything but 200: 429 and 5xx are `Retryable` (with the server's wait), every other
    answer is a final `Refused` whose message names the status and what it means for us."""
    if status == 200:
        return
    phrase = f"HTTP {status} {reason or ''}".strip()
    where = f" ({what})" if what else ""
    if status == 429:
        raise Retryable(f"{phrase}: rate limited{where}", parse_retry_after(retry_after, cap))
    if status >= 500:
        raise Retryable(f"{phrase}{where}", parse_retry_after(retry_after, cap))
    if status in (404, 410):
        raise Refused(f"{phrase}: {subject} gone (post deleted after listing?){where}")
    if status in (401, 403):
        raise Refused(f"{phrase}: access refused (credentials, or the site blocks us){where}")
    raise Refused(f"{phrase}: unexpected answer{where}")
