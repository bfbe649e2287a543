"""The poll loop: every tracked tag of every site, incrementally, through one client and limiter a site.

Per tag, a cursor remembers the newest and oldest ids seen. The first sync walks back from the newest
post page by page with `id:<OLDEST` (never deep `pid` values, which the site refuses) up to
`backfill_pages`; later polls ask only `id:>NEWEST`, so an idle poll costs one request per tag. Rows are
committed page by page, and only then are their downloads enqueued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
from sqlmodel import select

from core.errors import WaifuError
from core.http import USER_AGENT
from core.logs import kv
from core.settings import Settings
from core.sites import DEFAULT_SITE
from db.engine import session_scope
from db.models import Character, ScrapeCursor, utcnow
from scraper.client import ApiPost, BooruClient, Unusable
from scraper.lock import only_scraper
from scraper.store import record_unusable, store_listed

log = logging.getLogger("waifu.scraper")

Enqueue = Callable[[Iterable[int]], int]


@dataclass
class TagReport:
    tag: str
    new: int = 0  # posts inserted and enqueued for download
    seen: int = 0  # posts listed by the API (new or not)
    requests: int = 0
    error: str | None = None


@dataclass
class PollReport:
    tags: list[TagReport] = field(default_factory=list)

    @property
    def new(self) -> int:
        return sum(t.new for t in self.tags)

    @property
    def requests(self) -> int:
        return sum(t.requests for t in self.tags)

    @property
    def errors(self) -> list[str]:
        return [f"{t.tag}: {t.error}" for t in self.tags if t.error]


def _default_enqueue(ids: Iterable[int]) -> int:
    from worker.steps import enqueue

    return enqueue("download", ids)


class TagPoller:
    """Polls one tag on one site; keeps its cursor in memory and saves it at the end."""

    def __init__(
        self,
        client: BooruClient,
        character: Character,
        characters: list[Character],
        settings: Settings,
        enqueue: Enqueue,
    ) -> None:
        self.client, self.character, self.characters = client, character, characters
        self.settings, self.enqueue = settings, enqueue
        self.site = client.site.name
        self.page_size = min(settings.page_size, client.site.max_page)  # what a full page holds on this site
        self.query = f"{character.tag} {character.extra_terms}".strip()
        self.report = TagReport(character.tag if self.site == DEFAULT_SITE else f"{self.site}:{character.tag}")

    async def _fetch(self, terms: str, limit: int | None = None) -> list[ApiPost]:
        unusable: list[Unusable] = []
        posts = await self.client.fetch_posts(
            f"{self.query} {terms}".strip(),
            limit=limit or self.page_size,
            on_request=self._count_request,
            on_unusable=unusable.append,
        )
        if unusable:
            await asyncio.to_thread(self._record_unusable, unusable)
        return posts

    def _record_unusable(self, unusable: list[Unusable]) -> None:
        with session_scope() as session:
            record_unusable(session, self.site, unusable)

    def _count_request(self) -> None:
        self.report.requests += 1

    async def _store(self, posts: list[ApiPost]) -> None:
        """Database and broker calls run in a thread: a blocked event loop would delay the other tags'
        requests past their slots (see core.ratelimit)."""
        if posts:
            await asyncio.to_thread(self._store_now, posts)

    def _store_now(self, posts: list[ApiPost]) -> None:
        new_ids = store_listed(self.site, posts, self.characters)
        self.enqueue(new_ids)  # only after the commit: a worker must find the row
        self.report.new += len(new_ids)
        self.report.seen += len(posts)

    async def catch_up(self, cursor: ScrapeCursor) -> None:
        """Everything above the cursor, newest first, continuing down while pages are full."""
        lower, upper, newest = cursor.newest_id, None, cursor.newest_id
        while True:
            terms = f"id:>{lower}" + (f" id:<{upper}" if upper is not None else "")
            raw = await self._fetch(terms)
            # the site may ignore a metatag: never trust it, filter here too
            page = [p for p in raw if p.id > lower and (upper is None or p.id < upper)]
            await self._store(page)
            if page:
                newest = max(newest, max(p.id for p in page))
            if len(raw) < self.page_size or not page:
                break
            upper = min(p.id for p in page)
        cursor.newest_id = newest  # advanced only once the whole gap is stored

    async def backfill(self, cursor: ScrapeCursor) -> None:
        """Walks back from the oldest id seen, up to `backfill_pages` pages, then marks the backfill done."""
        if self.settings.backfill_pages == 0:
            if cursor.newest_id is None:  # start from "now": remember the newest id, fetch nothing old
                newest = await self._fetch("", limit=1)
                cursor.newest_id = max((p.id for p in newest), default=0)
            cursor.backfill_done = True
            return
        for _ in range(self.settings.backfill_pages):
            upper = cursor.oldest_id
            raw = await self._fetch(f"id:<{upper}" if upper is not None else "")
            page = [p for p in raw if upper is None or p.id < upper]
            await self._store(page)
            if page:
                ids = [p.id for p in page]
                cursor.oldest_id = min(ids)
                cursor.newest_id = max(cursor.newest_id or 0, max(ids))
            if len(raw) < self.page_size or not page:
                break
        cursor.backfill_done = True
        if cursor.newest_id is None:
            cursor.newest_id = 0  # nothing posted yet: every future post is new

    async def poll(self) -> TagReport:
        with session_scope() as session:
            cursor = session.get(ScrapeCursor, (self.site, self.character.tag)) or ScrapeCursor(
                site=self.site, tag=self.character.tag
            )
        try:
            if cursor.newest_id is not None and cursor.backfill_done:
                await self.catch_up(cursor)
            else:
                if cursor.newest_id is not None:
                    await self.catch_up(cursor)  # an interrupted first sync: new posts first, then go on back
                await self.backfill(cursor)
            cursor.last_error = None
        except WaifuError as exc:
            self.report.error = str(exc)
            cursor.last_error = str(exc)[:2000]
            log.error(kv("poll failed", site=self.site, tag=self.character.tag, error=exc))
        finally:
            cursor.requests += self.report.requests
            cursor.last_poll_at = utcnow()
            with session_scope() as session:
                session.merge(cursor)
        log.info(
            kv(
                "polled",
                site=self.site,
                tag=self.character.tag,
                new=self.report.new,
                seen=self.report.seen,
                requests=self.report.requests,
                newest=cursor.newest_id,
                error=self.report.error,
            )
        )
        return self.report


async def poll_once(
    settings: Settings,
    enqueue: Enqueue | None = None,
    session: aiohttp.ClientSession | None = None,
    clients: dict[str, BooruClient] | None = None,
) -> PollReport:
    """One pass over every tracked character of every site, all concurrently; one client (and limiter) a site."""
    with session_scope(readonly=True) as db:
        characters = list(db.exec(select(Character).order_by(Character.site, Character.tag)).all())
    if not characters:
        log.warning(kv("nothing to poll", hint="add characters with `waifu characters add TAG`"))
        return PollReport()
    if session is None:
        async with aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}) as http:
            return await poll_once(settings, enqueue, http, clients)
    clients = clients if clients is not None else {}
    for site in {c.site for c in characters} - set(clients):
        clients[site] = BooruClient(session, settings, settings.site(site))
    pollers = [TagPoller(clients[c.site], c, characters, settings, enqueue or _default_enqueue) for c in characters]
    return PollReport(list(await asyncio.gather(*(p.poll() for p in pollers))))


async def run_forever(settings: Settings, stop: asyncio.Event, enqueue: Enqueue | None = None) -> None:
    """Polls every `poll_interval` seconds until `stop` is set; one client (and limiter) a site for the whole
    life."""
    async with aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}) as http:
        clients: dict[str, BooruClient] = {}
        while not stop.is_set():
            poll = asyncio.ensure_future(poll_once(settings, enqueue, http, clients))
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({poll, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not poll.done():
                poll.cancel()  # stop requested mid-poll: what was committed stays; the cursor is re-read next time
                await asyncio.gather(poll, return_exceptions=True)
                stopper.cancel()
                break
            stopper.cancel()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=settings.poll_interval)


def run(settings: Settings, once: bool) -> PollReport | None:
    """Sync entry for the CLI: SIGINT/SIGTERM stop cleanly. Returns the report of a `--once` pass."""

    async def main() -> PollReport | None:
        async with only_scraper(settings.broker_url):
            return await run_locked()

    async def run_locked() -> PollReport | None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if once:
            task = asyncio.ensure_future(poll_once(settings))
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return None
            return task.result()
        log.info(kv("scraper started", interval=settings.poll_interval, rps=settings.requests_per_second))
        await run_forever(settings, stop)
        log.info(kv("scraper stopped"))
        return None

    return asyncio.run(main())
