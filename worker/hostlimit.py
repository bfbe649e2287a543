"""Per-host download limit shared by every io worker process, kept in Redis by the `limits` library.

A moving window guarantees that no window of the limit's length ever holds more grants than allowed,
across processes and machines that share the broker's Redis.
"""

from __future__ import annotations

import time
from fractions import Fraction
from functools import lru_cache

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from waifu.settings import Settings

NAMESPACE = "waifu-download"


def rate_item(per_second: float) -> RateLimitItem:
    """`limits` wants an integer amount per whole number of seconds: 2/s -> 2 per 1 s, 0.5/s -> 1 per 2 s."""
    ratio = Fraction(per_second).limit_denominator(60)
    return RateLimitItemPerSecond(max(1, ratio.numerator), max(1, ratio.denominator), namespace=NAMESPACE)


@lru_cache(maxsize=4)
def _limiter(redis_url: str) -> MovingWindowRateLimiter:
    return MovingWindowRateLimiter(storage_from_string(redis_url))


def wait_for_slot(host: str, settings: Settings, poll: float = 0.05) -> float:
    """Blocks until a download from `host` may start; returns the seconds waited."""
    limiter = _limiter(settings.broker_url)
    item = rate_item(settings.downloads_per_second)
    started = time.monotonic()
    while not limiter.hit(item, host):
        reset_at, _remaining = limiter.get_window_stats(item, host)
        time.sleep(min(1.0, max(poll, reset_at - time.time())))
    return time.monotonic() - started
