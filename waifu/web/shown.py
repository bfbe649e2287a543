"""Named pictures kept in memory for the page that shows them, under a random key, for a while: nothing of
an uploaded picture is written to disk. Oldest dropped past `max_bytes`, each gone after `ttl` seconds."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class Shown:
    def __init__(
        self, max_bytes: int = 64 * 1024 * 1024, ttl: float = 900.0, clock: Callable[[], float] = time.monotonic
    ):
        self.max_bytes, self.ttl, self.clock = max_bytes, ttl, clock
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (kept at, data), oldest first
        self._size = 0
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        key = secrets.token_urlsafe(24)
        with self._lock:
            self._expire()
            self._items[key] = (self.clock(), data)
            self._size += len(data)
            while self._size > self.max_bytes and self._items:
                self._drop(next(iter(self._items)))
        return key

    def get(self, key: str) -> bytes | None:
        with self._lock:
            self._expire()
            item = self._items.get(key)
        return item[1] if item else None

    def _expire(self) -> None:
        now = self.clock()
        while self._items:
            key, (kept, _data) = next(iter(self._items.items()))
            if now - kept < self.ttl:
                break
            self._drop(key)

    def _drop(self, key: str) -> None:
        _kept, data = self._items.pop(key)
        self._size -= len(data)
