"""The poll loop: every tracked tag of every site, incrementally, through one client and limiter a site.

Design notes: docs/architecture.md, `scraper/poller.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
from sqlmodel import col, select

from core.errors import Refused, WaifuError
from core.http import USER_AGENT
from core.logs import kv
from core.settings import Settings
from core.sites import DEFAULT_SITE
from db.engine import session_scope
from db.models import Character, ScrapeCursor, utcnow
from labels.splits import short_of_faces
from scraper.client import ApiPost, BooruClient, Page, Unusable
from scraper.lock import only_scraper
from scraper.store import rows_listed, store_listed

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


class TagPoller:
    """Polls one tag on one site; keeps its cursor in memory and saves it at the end."""

    def __init__(
        self,
        client: BooruClient,
        character: Character,
        characters: list[Character],
        settings: Settings,
        enqueue: Enqueue,
        deeper: bool = False,
    ) -> None:
        self.client, self.character, self.characters = client, character, characters
        self.settings, self.enqueue = settings, enqueue
        self.deeper = deeper  # short of faces: walk on back, past the first sync's backfill
        self.site = client.site.name
        self.page_size = min(settings.page_size, client.site.max_page)  # what a full page holds on this site
        self.query = f"{character.tag} {character.extra_terms}".strip()
        self.report = TagReport(character.tag if self.site == DEFAULT_SITE else f"{self.site}:{character.tag}")

    async def _fetch(self, terms: str) -> Page:
        return await self.client.fetch_page(
            f"{self.query} {terms}".strip(), limit=self.page_size, on_request=self._count_request
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

    def _full(self, page: Page, ids: list[int], terms: str) -> bool:
        """Whether a walk may go on below this page: it was full (by what it listed, usable or not) and
        listed ids (`ids`: those in the range asked for) to page down from. A full page of entries without
        an id leaves nothing to page down from: refused, so the cursor stays below whatever lies beneath it."""
        if page.listed < self.page_size:
            return False
        if not ids and len(page.ids) < page.listed:
            raise Refused(
                f"a full page ({terms}) listed no post id to page down from: {page.listed} entries, "
                f"{page.listed - len(page.ids)} without a usable id"
            )
        return bool(ids)

    @staticmethod
    def _floor(cursor: ScrapeCursor) -> int:
        """The lowest id this tag takes: a listed post at or above it that is no row yet is wanted, whatever
        the cursor says; below it lies what the backfill chose not to walk to, or nothing once a walk reached
        the tag's oldest post. A cursor from before floors were kept gets the cursor itself (never a walk back
        through the tag's whole history)."""
        if cursor.history_done:
            return 1  # every post the tag has is wanted: one listed without its id at the bottom comes in later
        if cursor.oldest_id is None:
            floor = (cursor.newest_id or 0) + 1
            if cursor.backfill_done:
                cursor.oldest_id = floor
            return floor
        return cursor.oldest_id

    async def _wanted(self, page: Page, ids: list[int], mark: int, floor: int) -> tuple[set[int], bool]:
        """The ids a catch-up stores: above the cursor (`mark`), or at or above the floor and either no row
        of this site yet or a stub the page now lists as a usable post (repaired). And whether any lay at or
        under the cursor with no row at all: the cursor stands ahead of real posts. One query, and only when
        the page lists ids at or under the cursor."""
        under = [i for i in ids if floor <= i <= mark]
        rows = await asyncio.to_thread(rows_listed, self.site, under) if under else {}
        usable = {p.id for p in page.posts}
        missing = {i for i in under if i not in rows}
        repaired = {i for i in under if rows.get(i) and i in usable}
        return {i for i in ids if i > mark} | missing | repaired, bool(missing)

    async def catch_up(self, cursor: ScrapeCursor) -> None:
        """The newest page, then down from the lowest id listed while pages are full and either lie above
        the cursor or held posts under it that were no rows yet; the cursor moves once the whole walk is
        stored. (The module docstring says why no `id:>NEWEST`.)"""
        mark, floor = cursor.newest_id, self._floor(cursor)
        if mark is None:
            raise ValueError("catch_up walks from a cursor a first sync has set (poll checks)")
        newest, upper = mark, None
        went_under = False  # stored posts at or under the cursor that had no row: it stands ahead of real posts
        reached: int | None = None  # the lowest id listed on the pages stored so far
        try:
            while True:
                terms = f"id:<{upper}" if upper is not None else ""
                page = await self._fetch(terms)
                ids = [i for i in page.ids if upper is None or i < upper]  # the site may ignore a metatag
                wanted, under = await self._wanted(page, ids, mark, floor)
                stored = await self._store(page, wanted.__contains__)
                newest = max(newest, *stored) if stored else newest
                went_under = went_under or under
                if ids:
                    reached = min(ids)
                if not self._full(page, ids, terms or "newest") or (min(ids) <= mark and not under):
                    break
                upper = min(ids)
        except BaseException:
            if went_under and reached is not None:
                # the stored pages now list nothing new: a cursor left ahead of them would end the next walk
                # above the entries never fetched. Below the floor nothing is wanted, so never under it.
                cursor.newest_id = min(mark, max(reached, floor) - 1)
            raise
        cursor.newest_id = newest

    async def backfill(self, cursor: ScrapeCursor) -> None:
        """Walks back from the oldest id seen, up to `backfill_pages` pages, then marks the backfill done.
        The cursor moves page by page over what each stored; at the end `oldest_id` is the tag's floor."""
        if self.settings.backfill_pages == 0:
            if cursor.newest_id is None:  # start from "now": remember the newest id, fetch nothing old
                newest = await self._fetch("")  # a page, not one entry: the newest may have no usable id
                if newest.listed and not newest.ids:
                    raise Refused(f"the newest page listed no post id to start from: {newest.listed} entries")
                cursor.newest_id = max(newest.ids, default=0)
                cursor.oldest_id = cursor.newest_id + 1  # the floor: nothing at or under it is taken
            cursor.backfill_done = True
            return
        await self._walk_back(cursor, self.settings.backfill_pages)
        cursor.backfill_done = True
        if cursor.newest_id is None:
            cursor.newest_id = 0  # nothing posted yet: every future post is new
        if cursor.oldest_id is None:
            cursor.oldest_id = cursor.newest_id + 1

    async def _walk_back(self, cursor: ScrapeCursor, pages: int) -> None:
        """Up to `pages` pages down from the oldest id seen; the cursor moves page by page over what each
        stored. A page that comes back not full is the tag's oldest: `history_done`."""
        for _ in range(pages):
            upper = cursor.oldest_id
            terms = f"id:<{upper}" if upper is not None else ""
            page = await self._fetch(terms)
            stored = await self._store(page, _below(upper))
            if stored:
                cursor.oldest_id = min(stored)
                cursor.newest_id = max(cursor.newest_id or 0, *stored)
            if page.listed < self.page_size:
                cursor.history_done = True
            if not self._full(page, stored, terms or "newest"):
                break

    async def deeper_backfill(self, cursor: ScrapeCursor) -> None:
        """A character short of labelled faces (labels.splits.short_of_faces) gets `deep_backfill_pages` more
        pages of its history each poll, through the same polite client, until the oldest post. Never when
        the first sync took no backfill (`backfill_pages` 0 means "from now on")."""
        pages = self.settings.deep_backfill_pages
        if not self.deeper or cursor.history_done or pages == 0 or self.settings.backfill_pages == 0:
            return
        before = cursor.oldest_id
        await self._walk_back(cursor, pages)
        log.info(
            kv(
                "deeper backfill",
                site=self.site,
                tag=self.character.tag,
                was=before,
                now=cursor.oldest_id,
                history_done=cursor.history_done,
            )
        )

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
                await self.deeper_backfill(cursor)
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
    enqueue: Enqueue,
    session: aiohttp.ClientSession | None = None,
    clients: dict[str, BooruClient] | None = None,
) -> PollReport:
    """One pass over every tracked character of every site, all concurrently; one client (and limiter) a site."""
    with session_scope(readonly=True) as db:
        characters = list(db.exec(select(Character).order_by(col(Character.site), col(Character.tag))).all())
    if not characters:
        log.warning(kv("nothing to poll", hint="add characters with `waifu characters add TAG`"))
        return PollReport()
    if session is None:
        async with aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}) as http:
            return await poll_once(settings, enqueue, http, clients)
    with session_scope(readonly=True) as db:
        short = short_of_faces(db, settings)
    clients = clients if clients is not None else {}
    for site in {c.site for c in characters} - set(clients):
        clients[site] = BooruClient(session, settings, settings.site(site))
    pollers = [
        TagPoller(clients[c.site], c, characters, settings, enqueue, deeper=(c.site, c.tag) in short)
        for c in characters
    ]
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


async def run_forever(settings: Settings, stop: asyncio.Event, enqueue: Enqueue) -> None:
    """Polls every `poll_interval_s` seconds until `stop` is set; one client (and limiter) a site for the whole
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
                log.exception(kv("poll pass failed", retry_in=settings.poll_interval_s))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=settings.poll_interval_s)


def run(settings: Settings, once: bool, enqueue: Enqueue) -> PollReport | None:
    """Sync entry for the CLI: SIGINT/SIGTERM stop cleanly. Returns the report of a `--once` pass. `enqueue`
    hands new posts to the download step (given by the caller: the scraper does not import the worker)."""

    async def main() -> PollReport | None:
        async with only_scraper(settings.broker_url):
            return await run_locked()

    async def run_locked() -> PollReport | None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if once:
            task = asyncio.ensure_future(poll_once(settings, enqueue))
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return None
            return task.result()
        log.info(kv("scraper started", interval=settings.poll_interval_s, rps=settings.requests_per_second))
        await run_forever(settings, stop, enqueue)
        log.info(kv("scraper stopped"))
        return None

    return asyncio.run(main())


def _below(upper: int | None) -> Callable[[int], bool]:
    """Which ids a page walking down from `upper` (exclusive; None: the newest page) may store."""
    return lambda i: upper is None or i < upper
