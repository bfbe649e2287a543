"""Rendered pictures kept in memory: the page's expensive images (an illustration decoded and boxed, a
matplotlib chart) are made once per version of what they show, not once per request.

Design notes: docs/architecture.md, `waifu/web/picture_cache.py`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class PictureCache:
    def __init__(
        self,
        max_bytes: int,
        ttl: float | None = None,
        parallel: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes, self.ttl, self.clock = max_bytes, ttl, clock
        self._items: OrderedDict[Hashable, tuple[float, bytes]] = OrderedDict()  # key -> (made at, data)
        self._size = 0
        self._lock = threading.Lock()
        self._making: dict[Hashable, threading.Lock] = {}
        self._renders = threading.BoundedSemaphore(parallel)
        self.renders = 0  # how many pictures were actually made (tests, logs)

    def get(self, key: Hashable, make: Callable[[], bytes]) -> bytes:
        with self._lock:
            data = self._fresh(key)
            if data is not None:
                return data
            making = self._making.setdefault(key, threading.Lock())
        with making:  # another request for the same picture waits for this rendering
            with self._lock:
                data = self._fresh(key)
            if data is not None:
                return data
            with self._renders:
                data = make()
                self.renders += 1
            with self._lock:
                self._store(key, data)
                self._making.pop(key, None)
        return data

    def _fresh(self, key: Hashable) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        made, data = item
        if self.ttl is not None and self.clock() - made >= self.ttl:
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return data

    def _store(self, key: Hashable, data: bytes) -> None:
        if key in self._items:
            self._drop(key)
        if len(data) > self.max_bytes:
            return  # larger than the whole budget: served, not kept
        self._items[key] = (self.clock(), data)
        self._size += len(data)
        while self._size > self.max_bytes:
            self._drop(next(iter(self._items)))

    def _drop(self, key: Hashable) -> None:
        _made, data = self._items.pop(key)
        self._size -= len(data)
