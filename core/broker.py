"""One Redis client per process for the broker's Redis: in-flight markers, locks, shared rate limits."""

from __future__ import annotations

from functools import lru_cache

import redis

from core.settings import get_settings


@lru_cache(maxsize=4)
def client_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def redis_client() -> redis.Redis:
    return client_for(get_settings().broker_url)
