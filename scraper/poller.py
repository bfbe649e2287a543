"""The poll loop: every tracked tag of every site, incrementally, through one client and limiter a site.

Per tag, a cursor remembers the newest and oldest ids seen. The first sync walks back from the newest
post page by page with `id:<OLDEST` (never deep `pid` values, which the site refuses) up to
`backfill_pages`; later polls ask only `id:>NEWEST`, so an idle poll costs one request per tag. Rows are
committed page by page, and only then are their downloads enqueued.

Nothing listed is lost: a page is full (the walk goes on) by the entries it lists, usable or not; the walk
pages down from the lowest id listed; an unusable entry with an id is stored as a stub; and the cursor
moves only over what is stored — a catch-up moves it once the whole gap is, a backfill page by page. A
poll that fails for any reason (ours, the database's, a bug) leaves the cursor where it was, records the
error on it and in the log with its traceback, and the next poll lists the rest again.
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

from core.errors import Refused, WaifuError
from core.http import USER_AGENT
from core.logs import kv
from core.settings import Settings
from core.sites import DEFAULT_SITE
from db.engine import session_scope
from db.models import Character, ScrapeCursor, utcnow
from scraper.client import ApiPost, BooruClient, Page, Unusable
from scraper.lock import only_scraper
from scraper.store import store_listed

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

    async def _fetch(self, terms: str, limit: int | None = None) -> Page:
        return await self.client.fetch_page(
            f"{self.query} {terms}".strip(), limit=limit or self.page_size, on_request=self._count_request
        )

    def _count_request(self) -> None:
        self.report.requests += 1

    async def _store(self, page: Page, wanted: Callable[[int], bool]) -> list[int]:
        """Stores the page's posts and unusable entries whose ids are `wanted` (the site may ignore a
        metatag: never trust it); returns those ids. Database and broker calls run in a thread: a blocked
        event loop would delay the other tags' requests past their slots (see core.ratelimit)."""
        posts = [p for p in page.posts if wanted(p.id)]
        unusable = [u for u in page.unusable if u.id is not None and wanted(u.id)]
        if posts or unusable:
            await asyncio.to_thread(self._store_now, posts, unusable)
        return [i for i in page.ids if wanted(i)]

    def _store_now(self, posts: list[ApiPost], unusable: list[Unusable]) -> None:
        new_ids = store_listed(self.site, posts, self.characters, unusable)
        self.enqueue(new_ids)  # only after the commit: a worker must find the row
        self.report.new += len(new_ids)
        self.report.seen += len(posts)

    def _walk_on(self, page: Page, stored: list[int], terms: str) -> bool:
        """Whether a walk goes on below this page: it was full (by what it listed, usable or not) and it
        listed ids to page down from. A full page of entries without an id leaves nothing to page down
        from: refused, so the cursor stays below whatever lies beneath it."""
        if page.listed < self.page_size:
            return False
        if not stored and len(page.ids) < page.listed:
            raise Refused(
                f"a full page ({terms}) listed no post id to page down from: {page.listed} entries, "
                f"{page.listed - len(page.ids)} without a usable id"
            )
        return bool(stored)

    async def catch_up(self, cursor: ScrapeCursor) -> None:
        """Everything above the cursor, newest first, paging down from the lowest id listed while pages
        are full; the cursor moves only once the whole gap is stored."""
        lower, upper, newest = cursor.newest_id, None, cursor.newest_id
        while True:
            terms = f"id:>{lower}" + (f" id:<{upper}" if upper is not None else "")
            page = await self._fetch(terms)
            stored = await self._store(page, lambda i, up=upper: i > lower and (up is None or i < up))
            if stored:
                newest = max(newest, *stored)
            if not self._walk_on(page, stored, terms):
                break
            upper = min(stored)
        cursor.newest_id = newest

    async def backfill(self, cursor: ScrapeCursor) -> None:
        """Walks back from the oldest id seen, up to `backfill_pages` pages, then marks the backfill done.
        The cursor moves page by page over what each stored."""
        if self.settings.backfill_pages == 0:
            if cursor.newest_id is None:  # start from "now": remember the newest id, fetch nothing old
                newest = await self._fetch("", limit=1)
                cursor.newest_id = max(newest.ids, default=0)
            cursor.backfill_done = True
            return
        for _ in range(self.settings.backfill_pages):
            upper = cursor.oldest_id
            terms = f"id:<{upper}" if upper is not None else ""
            page = await self._fetch(terms)
            stored = await self._store(page, lambda i, up=upper: up is None or i < up)
            if stored:
                cursor.oldest_id = min(stored)
                cursor.newest_id = max(cursor.newest_id or 0, *stored)
            if not self._walk_on(page, stored, terms or "newest"):
                break
        cursor.backfill_done = True
        if cursor.newest_id is None:
            cursor.newest_id = 0  # nothing posted yet: every future post is new

    def _failed(self, cursor: ScrapeCursor, message: str) -> None:
        """The cursor stays where the stored posts are; the next poll lists the rest again."""
        self.report.error = message
        cursor.last_error = message[:2000]

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
        except WaifuError as exc:  # ours: the message says it all
            self._failed(cursor, str(exc))
            log.error(kv("poll failed", site=self.site, tag=self.character.tag, error=exc))
        except Exception as exc:  # anything else (a driver's refusal, a bug): with its traceback
            self._failed(cursor, describe(exc))
            log.exception(kv("poll failed", site=self.site, tag=self.character.tag, error=self.report.error))
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
    # every poll's outcome is taken: one failing where it cannot even save its cursor is reported and
    # logged, not dropped with the others' results
    results = await asyncio.gather(*(p.poll() for p in pollers), return_exceptions=True)
    return PollReport([_taken(poller, result) for poller, result in zip(pollers, results, strict=True)])


def _taken(poller: TagPoller, result: TagReport | BaseException) -> TagReport:
    if isinstance(result, TagReport):
        return result
    if not isinstance(result, Exception):
        raise result  # cancelled, interrupted: not an outcome to report
    poller.report.error = describe(result)
    log.error(kv("poll failed", site=poller.site, tag=poller.character.tag, error=poller.report.error), exc_info=result)
    return poller.report


def describe(exc: BaseException) -> str:
    """An error that is not ours, in a line a person reads on the cursor (the log has the traceback and,
    for a database error, the statement)."""
    first = next((line for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


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
            try:
                poll.result()
            except Exception:  # the pass could not run (the database unreachable...): seen, tried again
                log.exception(kv("poll pass failed", retry_in=settings.poll_interval))
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
