"""Password guesses slow down. After `free` failures from one client, and after `total_free` failures from
everyone together (many addresses guessing at once), each further failure locks password checks for a
delay that doubles with every failure (1 s, 2 s, 4 s ... up to a cap). While locked, a password is not even
looked at: the answer is 429 with Retry-After. A success forgets the client's failures; an hour without a
failure forgets everything.

Design notes: docs/architecture.md, `waifu/web/throttle.py`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from core.logs import kv

log = logging.getLogger("waifu.web")


@dataclass
class Failures:
    count: int = 0
    last: float = 0.0  # clock time of the latest failure
    locked_until: float = 0.0


class Throttled(Exception):
    """Password checks are locked for this client for `wait` more seconds."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"too many failed logins: try again in {max(1, round(wait))} s")
        self.wait = wait


class Throttle:
    def __init__(
        self,
        free: int = 5,
        total_free: int = 20,
        base: float = 1.0,
        cap: float = 900.0,
        total_cap: float = 60.0,
        forget_after: float = 3600.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free, self.total_free, self.base, self.cap, self.total_cap = free, total_free, base, cap, total_cap
        self.forget_after, self.max_clients, self.clock = forget_after, max_clients, clock
        self.clients: OrderedDict[str, Failures] = OrderedDict()  # least recently failed first
        self.total = Failures()

    def check(self, client: str) -> None:
        """Raises Throttled while this client (or everyone) must wait before its next password check."""
        now = self.clock()
        self._forget(now)
        own = self.clients.get(client)
        wait = max((own.locked_until if own else 0.0), self.total.locked_until) - now
        if wait > 0:
            raise Throttled(wait)

    def failed(self, client: str, where: str) -> None:
        now = self.clock()
        own = self.clients.pop(client, None) or Failures()
        self.clients[client] = own  # now the most recent
        while len(self.clients) > self.max_clients:
            self.clients.popitem(last=False)
        self._count(own, now, self.free, self.cap)
        self._count(self.total, now, self.total_free, self.total_cap)
        log.warning(
            kv(
                "login failed",
                client=client,
                via=where,
                failures=own.count,
                locked_s=round(max(own.locked_until, self.total.locked_until, now) - now, 1) or None,
                failures_all=self.total.count,
            )
        )

    def succeeded(self, client: str) -> None:
        self.clients.pop(client, None)

    def _count(self, failures: Failures, now: float, free: int, cap: float) -> None:
        failures.count += 1
        failures.last = now
        if failures.count > free:
            failures.locked_until = now + min(cap, self.base * 2 ** min(failures.count - free - 1, 40))

    def _forget(self, now: float) -> None:
        while self.clients:
            client, oldest = next(iter(self.clients.items()))
            if now - oldest.last < self.forget_after:
                break
            del self.clients[client]
        if self.total.count and now - self.total.last >= self.forget_after:
            self.total = Failures()
