"""One scraper at a time: the API limit lives in the scraper process, so a second process would double
the rate a site sees. The running scraper holds a lock in the broker's Redis, renewed while it runs;
a second `waifu scrape` (forever or --once) refuses to start and says who holds it. A scraper killed
with SIGKILL frees the lock when it runs out (LOCK_S)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from typing import cast

from redis.lock import Lock

from core.broker import client_for
from core.errors import Unavailable
from core.logs import kv
from db.models import utcnow

KEY = "waifu:scraper-lock"
LOCK_S = 30
RENEW_EVERY = 10


def holder_description() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {utcnow():%Y-%m-%d %H:%M:%S} UTC"


@contextlib.asynccontextmanager
async def only_scraper(redis_url: str) -> AsyncIterator[None]:
    """Holds the scraper lock for the block; raises Unavailable when another scraper holds it."""
    import logging

    log = logging.getLogger("waifu.scraper")
    client = client_for(redis_url)
    lock = Lock(client, KEY, timeout=LOCK_S, thread_local=False)  # renewed from a worker thread
    if not lock.acquire(blocking=False, token=holder_description()):
        holder = cast("bytes | None", client.get(KEY))  # redis-py types every reply as sync-or-async
        raise Unavailable(
            f"another scraper is running ({(holder or b'?').decode()}): one scraper keeps the "
            f"site's request limit; stop it first, or wait for its next poll"
        )

    async def renew() -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            await asyncio.to_thread(lock.reacquire)

    renewing = asyncio.ensure_future(renew())
    try:
        yield
    finally:
        renewing.cancel()
        await asyncio.gather(renewing, return_exceptions=True)
        try:
            lock.release()
        except Exception as exc:  # ran out while we were stopped: nothing to release
            log.warning(kv("scraper lock already gone", error=type(exc).__name__))
