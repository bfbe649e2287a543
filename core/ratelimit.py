"""Per-host download limit shared by every io worker process, kept in the broker's Redis by `limits`.

A moving window guarantees that no window of the limit's length ever holds more grants than allowed,
across processes and machines that share the Redis. A grant is taken at the moment the request starts
(a late wake-up only tests the window again), so a busy machine never squeezes two requests together.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

NAMESPACE = "waifu-download"
# longest window tried for a fractional rate: longer ones would allow a long silence followed by a burst
MAX_PERIOD = 60


def whole_rate(per_second: float) -> tuple[int, int]:
    """(amount, seconds) with whole numbers, as `limits` wants them, never faster than `per_second`:
    2/s -> 2 per 1 s, 0.5/s -> 1 per 2 s, 0.3/s -> 3 per 10 s, 0.005/s -> 1 per 200 s."""
    best = (0, 1)
    for period in range(1, MAX_PERIOD + 1):
        amount = math.floor(round(per_second * period, 9))  # round: 0.1 * 3 is 0.30000000000000004
        if amount * best[1] > best[0] * period:  # strictly better: the shortest window wins ties
            best = (amount, period)
    if best[0] == 0:  # slower than one per minute
        return 1, math.ceil(round(1 / per_second, 9))
    return best


@lru_cache(maxsize=16)
def rate_items(per_second: float) -> tuple[RateLimitItem, ...]:
    """The limits one grant must pass. A multi-second window (7 per 10 s) would let its 7 grants come at
    once, so it gets a 1-second companion (1 per 1 s): no second ever holds more than ceil(rate)."""
    amount, period = whole_rate(per_second)
    window = RateLimitItemPerSecond(amount, period, namespace=NAMESPACE)
    burst = math.ceil(per_second)
    if amount <= burst:
        return (window,)
    return RateLimitItemPerSecond(burst, 1, namespace=NAMESPACE), window


@lru_cache(maxsize=4)
def _limiter(redis_url: str) -> MovingWindowRateLimiter:
    return MovingWindowRateLimiter(storage_from_string(redis_url))


def _hit_all(limiter: MovingWindowRateLimiter, items: tuple[RateLimitItem, ...], host: str) -> bool:
    # Each hit is atomic in Redis, the pair is not: testing first keeps a full long window from eating
    # 1-second slots. A lost race only wastes a slot (slower), never grants one too many.
    if not all(limiter.test(item, host) for item in items):
        return False
    return all(limiter.hit(item, host) for item in items)


def _until_free(limiter: MovingWindowRateLimiter, items: tuple[RateLimitItem, ...], host: str, poll: float) -> float:
    """Seconds until the fullest window frees a slot (polled at least every second: other hosts' clocks)."""
    now = time.time()
    waits = [stats.reset_time - now for item in items if (stats := limiter.get_window_stats(item, host)).remaining <= 0]
    return min(1.0, max([poll, *waits]))


def wait_for_slot(host: str, per_second: float, redis_url: str, poll: float = 0.05) -> float:
    """Blocks until a download from `host` may start; returns the seconds waited."""
    limiter = _limiter(redis_url)
    items = rate_items(per_second)
    started = time.monotonic()
    while not _hit_all(limiter, items, host):
        time.sleep(_until_free(limiter, items, host, poll))
    return time.monotonic() - started
