"""The poller end to end against the fake: cursors, incremental polls, upsert, enqueue after commit.

Runs on SQLite and PostgreSQL; downloads are enqueued into the real test Redis (no worker here).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import aiohttp
import pytest
from sqlmodel import select

from core.settings import get_settings, reset_settings_cache
from db.engine import session_scope
from db.models import Character, Post, PostCharacter, PostState, ScrapeCursor
from scraper.characters import add_characters
from scraper.poller import poll_once, run_forever
from tests.support.broker import queued_ids
from tests.support.drawn import drawn_image
from tests.support.fake_safebooru import FakePost, FakeSafebooru, publish
from tests.support.limits import max_in_window
from tests.support.rows import ready_face
from waifu.cli import enqueue_downloads


@pytest.fixture
def scrape_env(service_env, fake: FakeSafebooru, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WAIFU_DEFAULT_SITE_URL", fake.base_url)
    monkeypatch.setenv("WAIFU_PAGE_SIZE", "20")
    monkeypatch.setenv("WAIFU_BACKFILL_PAGES", "10")
    reset_settings_cache()
    return get_settings()


def new_post(fake: FakeSafebooru, tags: str, seed: str, **kw) -> FakePost:
    data = hashlib.sha256(seed.encode()).digest() * 10
    return fake.add(FakePost(id=fake.next_id(), tags=tags, data=data, image=f"{seed}.jpg", **kw))


def rows() -> dict[int, Post]:
    """Posts by the site's own id (the fake's ids); `row.id` is ours."""
    with session_scope() as session:
        return {p.remote_id: p for p in session.exec(select(Post)).all()}


def queued(redis_client) -> list[int]:
    """The site ids of the posts whose download is queued."""
    ours = {p.id: remote for remote, p in rows().items()}
    return sorted(ours[i] for i in queued_ids(redis_client))


async def test_first_sync_then_incremental_polls(scrape_env, fake: FakeSafebooru, redis_client) -> None:
    counts = {"nishikino_maki": 26, "sakurauchi_riko": 23, "takimoto_hifumi": 21}
    per_tag = {tag: [(drawn_image(f"{tag}/{i}"), ".png") for i in range(n)] for tag, n in counts.items()}
    # a repost, as real sets hold (the real one: takimoto_hifumi 3.jpg = 11.jpg), listed on the same page
    per_tag["takimoto_hifumi"][10] = per_tag["takimoto_hifumi"][2]
    published = publish(fake, per_tag)
    original, repost = sorted((p for p in published if p.data == per_tag["takimoto_hifumi"][2][0]), key=lambda p: p.id)
    tags = sorted(counts)
    add_characters(tags)

    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.errors == []
    assert len(rows()) == len(published)
    # the repost is skipped, not downloaded twice
    originals = {}
    for p in sorted(published, key=lambda p: p.id):
        originals.setdefault(p.md5, p.id)
    assert report.new == len(originals) == len(published) - 1
    assert rows()[repost.id].state == PostState.skipped and rows()[repost.id].duplicate_of == rows()[original.id].id
    assert queued(redis_client) == sorted(originals.values())
    listed = {t: sum(t in p.tags.split() for p in published) for t in tags}
    assert min(listed.values()) > 20, "every tag needs more than one page here"
    # at 20 a page: the full pages, then the short one that ends the walk back (26/23/21 posts: 2 each),
    # walking back with id:< and never with a deep pid
    assert [t.requests for t in report.tags] == [listed[t.tag] // 20 + 1 for t in report.tags]
    assert all(r.query.get("pid", "0") == "0" for r in fake.api_requests())
    assert any("id:<" in r.query["tags"] for r in fake.api_requests())

    # the site publishes 5 more posts: the next poll stores exactly those, with one request per tag for
    # its newest page (no `id:>` filter: a bogus id must not hide later posts), which reaches the cursor
    redis_client.delete("io")
    fresh = [new_post(fake, f"1girl {tags[i % 3]}", f"fresh{i}") for i in range(5)]
    fake.requests.clear()
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.new == 5
    assert queued(redis_client) == sorted(p.id for p in fresh)
    assert len(fake.api_requests()) == len(tags)
    assert all("id:" not in r.query["tags"] for r in fake.api_requests())

    # nothing new: exactly one request per tag, nothing enqueued
    redis_client.delete("io")
    fake.requests.clear()
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.new == 0 and len(fake.api_requests()) == len(tags)
    assert redis_client.llen("io") == 0
    with session_scope() as session:
        cursors = {c.tag: c for c in session.exec(select(ScrapeCursor)).all()}
    assert set(cursors) == set(tags) and all(c.backfill_done and c.last_error is None for c in cursors.values())
    assert max(c.newest_id for c in cursors.values()) == max(p.id for p in fresh)


async def test_catch_up_pages_through_a_large_gap(scrape_env, fake: FakeSafebooru, redis_client) -> None:
    add_characters(["riko"])
    new_post(fake, "riko", "seed0")
    await poll_once(scrape_env, enqueue_downloads)
    burst = [new_post(fake, "riko", f"burst{i}") for i in range(45)]  # more than two pages of 20
    redis_client.delete("io")
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.new == 45 and report.tags[0].requests == 3
    assert queued(redis_client) == sorted(p.id for p in burst)


async def test_backfill_is_bounded(scrape_env, fake: FakeSafebooru, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAIFU_BACKFILL_PAGES", "2")
    reset_settings_cache()
    add_characters(["maki"])
    posts = [new_post(fake, "maki", f"old{i}") for i in range(70)]
    report = await poll_once(get_settings(), enqueue_downloads)
    assert report.new == 40 and report.tags[0].requests == 2
    assert set(rows()) == {p.id for p in posts[-40:]}, "the newest 40 are kept, the oldest are not walked to"


async def test_post_under_two_tags_is_one_row_with_two_links(scrape_env, fake: FakeSafebooru, redis_client) -> None:
    add_characters(["maki", "riko"])
    both = new_post(fake, "maki riko", "both")
    new_post(fake, "maki", "only_maki")
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.new == 2
    assert queued(redis_client) == sorted(rows())  # the shared post is enqueued once
    with session_scope() as session:
        tags = session.exec(
            select(Character.tag)
            .join(PostCharacter, PostCharacter.character_id == Character.id)
            .where(PostCharacter.post_id == rows()[both.id].id)
        ).all()
    assert sorted(tags) == ["maki", "riko"]


def test_two_pollers_storing_one_post_at_once_make_one_row(scrape_env) -> None:
    """The tag pollers run at once: while one has inserted a post carrying both tags and not yet committed,
    the other stores the same post. It waits for the first (PostgreSQL: the unique index; SQLite: the
    write lock), then finds its row and adds nothing twice, instead of failing on the unique key."""
    import threading

    from scraper.client import ApiPost
    from scraper.store import store_listed, upsert_posts

    add_characters(["maki", "riko"])
    with session_scope() as session:
        characters = list(session.exec(select(Character)).all())
    post = ApiPost.model_validate(
        {
            "id": 77,
            "hash": "ab" * 16,
            "file_url": "https://safebooru.org/images/1/a.jpg",
            "tags": "maki riko",
            "rating": "general",
        }
    )
    second: dict[str, object] = {}

    def other_poller() -> None:
        try:
            second["ids"] = store_listed("safebooru", [post], characters)
        except Exception as exc:
            second["error"] = exc

    with session_scope() as session:  # the first poller's transaction, held open
        first_ids = upsert_posts(session, "safebooru", [post], characters)
        thread = threading.Thread(target=other_poller)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive(), "the second store did not wait for the first transaction"
    thread.join(30)
    assert "error" not in second, second.get("error")
    assert len(first_ids) == 1 and second["ids"] == []  # new once: downloaded once
    with session_scope() as session:
        assert len(session.exec(select(Post)).all()) == 1
        assert len(session.exec(select(PostCharacter)).all()) == 2


async def test_rating_filter_and_reposts_are_skipped_with_reasons(
    scrape_env, fake: FakeSafebooru, redis_client
) -> None:
    add_characters(["maki"], ratings="general,safe")
    original = new_post(fake, "maki", "orig")
    racy = new_post(fake, "maki", "racy", rating="questionable")
    repost = fake.add(FakePost(id=fake.next_id(), tags="maki", data=original.data, image="again.jpg"))
    await poll_once(scrape_env, enqueue_downloads)
    by_id = rows()
    assert by_id[original.id].state == PostState.discovered
    assert by_id[racy.id].state == PostState.skipped and "rating 'questionable' filtered" in by_id[racy.id].reason
    assert by_id[repost.id].state == PostState.skipped
    assert by_id[repost.id].reason.startswith(f"duplicate of safebooru post {original.id}")
    assert by_id[repost.id].duplicate_of == by_id[original.id].id
    assert queued(redis_client) == [original.id]


async def test_api_failure_of_one_poll_is_recorded_and_recovers(
    scrape_env, fake: FakeSafebooru, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WAIFU_API_RETRIES", "1")
    reset_settings_cache()
    add_characters(["maki"])
    first = new_post(fake, "maki", "a")
    fake.api_faults.extend(["malformed", "malformed"])
    report = await poll_once(get_settings(), enqueue_downloads)
    assert "malformed JSON" in report.errors[0]
    with session_scope() as session:
        cursor = session.get(ScrapeCursor, ("safebooru", "maki"))
        assert "malformed JSON" in cursor.last_error and cursor.requests == 2
    assert rows() == {}
    report = await poll_once(get_settings(), enqueue_downloads)  # the API is fine again: nothing was lost
    assert report.errors == [] and set(rows()) == {first.id}


async def test_polite_with_several_tags(scrape_env, fake: FakeSafebooru, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAIFU_REQUESTS_PER_SECOND", "2")
    monkeypatch.setenv("WAIFU_PAGE_SIZE", "5")
    reset_settings_cache()
    tags = ["a_chan", "b_chan", "c_chan", "d_chan"]
    add_characters(tags)
    for i in range(32):  # 8 per tag at 5 a page: 2 requests per tag
        new_post(fake, tags[i % 4], f"p{i}")
    # when each request leaves the client (what the limiter controls), and when the site sees it: the
    # second also carries the test machine's scheduling jitter, so it gets 0.1 s of slack
    sent: list[float] = []

    async def on_start(*_) -> None:
        sent.append(time.monotonic())

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as http:
        await poll_once(get_settings(), enqueue_downloads, http)
    seen = [r.at for r in fake.api_requests()]
    assert len(sent) == len(seen) >= 8
    assert max_in_window(sent) <= 2
    assert max_in_window(seen, window=0.9) <= 2


async def test_run_forever_stops_promptly(scrape_env, fake: FakeSafebooru, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAIFU_POLL_INTERVAL_S", "3600")
    reset_settings_cache()
    add_characters(["maki"])
    new_post(fake, "maki", "a")
    stop = asyncio.Event()
    task = asyncio.ensure_future(run_forever(get_settings(), stop, enqueue_downloads))
    for _ in range(100):
        if rows():
            break
        await asyncio.sleep(0.05)
    assert len(rows()) == 1
    stop.set()
    await asyncio.wait_for(task, 5)  # sleeping an hour must not delay a stop


async def test_run_forever_stopped_mid_poll_ends_at_once_and_loses_nothing(
    scrape_env, fake: FakeSafebooru, redis_client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The stop arrives while a catch-up waits out a 429's one-minute Retry-After between its first and
    second page: the run ends at once, the committed page stays, and the cursor is not moved past the posts
    of the pages never fetched, so the next poll gets them."""
    monkeypatch.setenv("WAIFU_POLL_INTERVAL_S", "3600")
    reset_settings_cache()
    add_characters(["maki"])
    first = new_post(fake, "maki", "before")
    assert (await poll_once(get_settings(), enqueue_downloads)).new == 1  # synced: the cursor stands at `first`
    burst = sorted(new_post(fake, "maki", f"burst{i}").id for i in range(45))  # 20 + 20 + 5 a page
    redis_client.delete("io")
    fake.requests.clear()
    fake.retry_after = "60"
    fake.api_faults.extend(["none", "429"])  # "none" is no fault: page 1 is answered, page 2 refused
    caplog.set_level(logging.WARNING, logger="waifu.scraper.client")

    stop = asyncio.Event()
    task = asyncio.ensure_future(run_forever(get_settings(), stop, enqueue_downloads))
    deadline = time.monotonic() + 30
    while not any("api retry" in r.getMessage() for r in caplog.records):  # now in the 60 s wait
        assert not task.done() and time.monotonic() < deadline, "the poll never reached the 429 on page 2"
        await asyncio.sleep(0.02)
    stop.set()
    started = time.monotonic()
    await asyncio.wait_for(task, 5)  # not after the minute the server asked for
    assert time.monotonic() - started < 5
    assert len(fake.api_requests()) == 2, "the refused page was asked again after the stop"

    newest_page = burst[-20:]
    assert set(rows()) == {first.id, *newest_page}  # the page committed before the stop stays
    assert queued(redis_client) == newest_page
    with session_scope() as session:
        cursor = session.get(ScrapeCursor, ("safebooru", "maki"))
    assert cursor.newest_id == first.id, f"cursor moved to {cursor.newest_id}, past 25 posts never stored"

    redis_client.delete("io")
    # the site answers again: the rest arrives, nothing twice
    report = await poll_once(get_settings(), enqueue_downloads)
    assert report.errors == [] and report.new == 25
    assert set(rows()) == {first.id, *burst}
    assert queued(redis_client) == burst[:25]


async def test_unusable_entries_become_failed_rows(scrape_env, fake: FakeSafebooru, redis_client) -> None:
    add_characters(["maki"])
    good = new_post(fake, "maki", "good")
    bad = new_post(fake, "maki", "bad", announced_md5="zzz")
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.new == 1 and queued(redis_client) == [good.id]
    row = rows()[bad.id]
    assert row.state == PostState.failed and "not an md5" in row.reason


# ------------------------------------------------------------------ the poller loses nothing ----
def cursor_of(tag: str, site: str = "safebooru") -> ScrapeCursor:
    with session_scope() as session:
        return session.get(ScrapeCursor, (site, tag))


async def test_gap_of_pages_with_unusable_entries_loses_nothing(scrape_env, fake: FakeSafebooru, redis_client) -> None:
    """Three pages of new posts (20 a page): the newest page holds one unusable entry (a bad md5), the
    next one nothing but unusable entries. A page is full by what it lists, usable or not: the walk goes
    on to the end, every post becomes a row, and the cursor stands at the newest."""
    add_characters(["miku"])
    synced = [new_post(fake, "miku", f"old{i}") for i in range(5)]
    assert (await poll_once(scrape_env, enqueue_downloads)).new == 5
    gap = [new_post(fake, "miku", f"gap{i}") for i in range(55)]
    bad_on_first_page = gap[-7]
    fake.entry_overrides[bad_on_first_page.id] = {"hash": "not-an-md5"}
    all_bad_page = gap[15:35]  # the second page, newest first: gap[35:15:-1]
    for post in all_bad_page:
        fake.entry_overrides[post.id] = {"hash": ""}
    redis_client.delete("io")

    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.errors == []
    by_id = rows()
    assert set(by_id) == {p.id for p in synced + gap}, "posts of the gap never became rows"
    unusable = {bad_on_first_page.id, *(p.id for p in all_bad_page)}
    assert {i for i, row in by_id.items() if row.state == PostState.failed} == unusable
    assert "not an md5" in by_id[bad_on_first_page.id].reason
    assert queued(redis_client) == sorted(p.id for p in gap if p.id not in unusable)
    assert cursor_of("miku").newest_id == gap[-1].id
    assert report.tags[0].requests == 3  # 20 + 20, then 15 + 5 synced: the page reaching the cursor ends it


async def test_out_of_range_ids_are_refused_and_later_posts_arrive(
    scrape_env, fake: FakeSafebooru, redis_client, caplog: pytest.LogCaptureFixture
) -> None:
    """Entries with ids beyond 2**63-1 (what a BIGINT holds), 0 or negative are unusable entries with a
    reason: no row, the cursor never moves to them, and a post published later still arrives."""
    add_characters(["rin"])
    real = [new_post(fake, "rin", f"real{i}") for i in range(10)]
    for bogus in (2**63, 2**64 + 5, 0, -5):
        fake.add(FakePost(id=bogus, tags="rin", data=f"bogus{bogus}".encode(), image=f"b{bogus}.jpg"))
    caplog.set_level(logging.WARNING, logger="waifu.scraper.client")

    # the first sync lists them all: the huge ones first, 0 and -5 last
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.errors == [] and report.new == 10
    assert set(rows()) == {p.id for p in real}
    cursor = cursor_of("rin")
    assert cursor.newest_id == real[-1].id and cursor.last_error is None
    refusals = [r.getMessage() for r in caplog.records if "unusable post" in r.getMessage()]
    assert any("less than or equal to 9223372036854775807" in m for m in refusals), refusals
    assert any("greater than 0" in m for m in refusals), refusals

    later = new_post(fake, "rin", "later")  # listed under the huge ids, which are refused again
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.errors == [] and report.new == 1
    assert later.id in rows() and cursor_of("rin").newest_id == later.id


def _refuse_inserts(table: str) -> None:
    """A trigger that makes the database refuse every new row of `table`: an error that is none of ours."""
    from sqlalchemy import text

    trigger = f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table}"
    with session_scope() as session:
        if session.get_bind().dialect.name == "sqlite":
            session.exec(text(f"{trigger} BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"))
        else:
            session.exec(
                text(
                    "CREATE OR REPLACE FUNCTION refuse_row() RETURNS trigger AS "
                    "$$ BEGIN RAISE EXCEPTION 'refused by a test trigger'; END $$ LANGUAGE plpgsql"
                )
            )
            session.exec(text(f"{trigger} FOR EACH ROW EXECUTE FUNCTION refuse_row()"))


def _allow_inserts(table: str) -> None:
    from sqlalchemy import text

    with session_scope() as session:
        on = "" if session.get_bind().dialect.name == "sqlite" else f" ON {table}"
        session.exec(text(f"DROP TRIGGER refuse_{table}{on}"))


async def test_foreign_exception_is_recorded_logged_and_retried(
    scrape_env, fake: FakeSafebooru, redis_client, caplog: pytest.LogCaptureFixture
) -> None:
    """An error that is not one of ours inside a tag poll (here the database refusing the rows) reaches
    the cursor's last_error and the log with its traceback; the other tag goes on, the cursor stays, and
    the next poll, once the cause is gone, stores everything."""
    add_characters(["maki", "riko"])
    riko = new_post(fake, "riko", "riko0")
    assert (await poll_once(scrape_env, enqueue_downloads)).errors == []
    maki = [new_post(fake, "maki", f"m{i}") for i in range(3)]
    maki_cursor, riko_cursor = cursor_of("maki").newest_id, cursor_of("riko").newest_id
    _refuse_inserts("post")
    caplog.set_level(logging.INFO, logger="waifu.scraper")

    report = await poll_once(scrape_env, enqueue_downloads)
    errors = {t.tag: t.error for t in report.tags}
    assert "refused by a test trigger" in errors["maki"] and errors["riko"] is None
    cursor = cursor_of("maki")
    assert cursor.last_error.endswith("refused by a test trigger") and cursor.newest_id == maki_cursor
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and "poll failed" in r.getMessage()]
    assert failures and failures[0].exc_info is not None, "logged without its traceback"
    assert set(rows()) == {riko.id} and cursor_of("riko").newest_id == riko_cursor

    _allow_inserts("post")
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.errors == [] and report.new == 3
    assert set(rows()) == {riko.id, *(p.id for p in maki)}
    assert cursor_of("maki").last_error is None and cursor_of("maki").newest_id == maki[-1].id


async def test_error_saving_a_cursor_is_reported_not_swallowed(
    scrape_env, fake: FakeSafebooru, caplog: pytest.LogCaptureFixture
) -> None:
    """Even the cursor's own save failing (where last_error cannot be written) reaches the report and the
    log with its traceback, instead of vanishing inside asyncio.gather."""
    add_characters(["maki"])
    new_post(fake, "maki", "a")
    _refuse_inserts("scrape_cursor")
    caplog.set_level(logging.INFO, logger="waifu.scraper")
    report = await poll_once(scrape_env, enqueue_downloads)
    assert "refused by a test trigger" in report.errors[0]
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info is not None]
    assert any("refused by a test trigger" in str(r.exc_info[1]) for r in failures)


async def test_run_forever_logs_a_failed_pass_and_polls_again(
    scrape_env, fake: FakeSafebooru, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole pass failing (the characters cannot be read) is logged with its traceback, and the loop
    polls again at the next interval: it stores the posts once the table is back."""
    from sqlalchemy import text

    monkeypatch.setenv("WAIFU_POLL_INTERVAL_S", "0.2")
    reset_settings_cache()
    add_characters(["maki"])
    post = new_post(fake, "maki", "a")
    with session_scope() as session:
        session.exec(text("ALTER TABLE character RENAME TO character_away"))
    caplog.set_level(logging.INFO, logger="waifu.scraper")
    stop = asyncio.Event()
    task = asyncio.ensure_future(run_forever(get_settings(), stop, enqueue_downloads))
    try:
        deadline = time.monotonic() + 30
        while sum("poll pass failed" in r.getMessage() for r in caplog.records) < 2:
            assert not task.done() and time.monotonic() < deadline, "the failed pass was not logged, or the loop ended"
            await asyncio.sleep(0.05)
        failed = next(r for r in caplog.records if "poll pass failed" in r.getMessage())
        assert failed.levelno == logging.ERROR and failed.exc_info is not None
        with session_scope() as session:
            session.exec(text("ALTER TABLE character_away RENAME TO character"))
        while post.id not in rows():
            assert not task.done() and time.monotonic() < deadline, "never polled again after the failure"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_unusable_stub_is_repaired_by_a_later_correct_listing(
    scrape_env, fake: FakeSafebooru, redis_client
) -> None:
    """A post first listed unusable is a failed stub (no md5, no URL). Listed correctly later, here by the
    first sync of another tag, it is filled in, moved to discovered, linked and enqueued."""
    add_characters(["maki"])
    post = new_post(fake, "maki riko", "both")
    fake.entry_overrides[post.id] = {"hash": "zzz", "file_url": None}
    await poll_once(scrape_env, enqueue_downloads)
    stub = rows()[post.id]
    assert stub.state == PostState.failed and stub.md5 == "" and stub.file_url == ""
    assert queued(redis_client) == []

    fake.entry_overrides.clear()  # the site lists it right from now on
    add_characters(["riko"])
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.errors == [] and report.new == 1
    repaired = rows()[post.id]
    assert repaired.id == stub.id and repaired.state == PostState.discovered and repaired.reason is None
    assert repaired.md5 == post.md5 and repaired.file_url.endswith(post.image)
    assert queued(redis_client) == [post.id]
    with session_scope() as session:
        linked = session.exec(
            select(Character.tag)
            .join(PostCharacter, PostCharacter.character_id == Character.id)
            .where(PostCharacter.post_id == repaired.id)
        ).all()
    assert sorted(linked) == ["maki", "riko"]


def test_a_stub_is_repaired_but_a_real_failure_is_not(scrape_env) -> None:
    """store_listed, the probe's way: the stub comes back to life; a post that failed its download keeps
    its failure (retry-failed is for that)."""
    from scraper.client import ApiPost, Unusable
    from scraper.store import store_listed

    add_characters(["miku"])
    with session_scope() as session:
        characters = list(session.exec(select(Character)).all())
    store_listed("safebooru", [], characters, unusable=[Unusable(1200, "unusable API entry: md5: not an md5")])
    with session_scope() as session:
        session.add(
            Post(
                remote_id=1300,
                md5="cd" * 16,
                file_url="https://safebooru.org//images/1/b.jpg",
                state="failed",
                reason="HTTP 404",
            )
        )

    def listed(remote_id: int, md5: str) -> ApiPost:
        return ApiPost.model_validate(
            {
                "id": remote_id,
                "hash": md5,
                "file_url": f"https://safebooru.org//images/1/{remote_id}.jpg",
                "tags": "miku",
            }
        )

    new_ids = store_listed("safebooru", [listed(1200, "ab" * 16), listed(1300, "cd" * 16)], characters)
    by_id = rows()
    assert new_ids == [by_id[1200].id]
    assert by_id[1200].state == PostState.discovered and by_id[1200].md5 == "ab" * 16
    assert by_id[1300].state == PostState.failed and by_id[1300].reason == "HTTP 404"


async def test_oversize_page_is_refused_and_recorded_on_the_tag(
    scrape_env, fake: FakeSafebooru, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WAIFU_API_MAX_PAGE_BYTES", str(1024 * 1024))
    reset_settings_cache()
    add_characters(["maki"])
    post = new_post(fake, "maki", "a")
    fake.oversize_bytes = 8 * 1024 * 1024
    fake.api_faults.append("oversize_chunked")
    report = await poll_once(get_settings(), enqueue_downloads)
    assert "over the size cap" in report.errors[0] and "WAIFU_API_MAX_PAGE_BYTES" in report.errors[0]
    assert "over the size cap" in cursor_of("maki").last_error
    assert rows() == {}
    report = await poll_once(get_settings(), enqueue_downloads)  # a sane page at the next poll
    assert report.errors == [] and set(rows()) == {post.id}


@pytest.mark.processes
async def test_scrape_once_cli_stores_a_gap_with_a_malformed_entry(fake: FakeSafebooru, service_env) -> None:
    """The probe through the CLI: after a first sync of posts 901..1000, posts 1001..1250 appear, 1200 with
    a malformed md5 on the newest full page. One `waifu scrape --once` (100 a page) makes every one a row."""
    from tests.support.cli import run_cli

    env = {**service_env, "WAIFU_DEFAULT_SITE_URL": fake.base_url}
    for i in range(901, 1001):
        fake.add(FakePost(id=i, tags="miku", data=f"post{i}".encode(), image=f"{i}.jpg"))
    assert (await run_cli(env, "characters", "add", "miku"))[0] == 0
    code, out, err = await run_cli(env, "scrape", "--once")
    assert code == 0, out + err
    assert set(rows()) == set(range(901, 1001))

    for i in range(1001, 1251):
        fake.add(FakePost(id=i, tags="miku", data=f"post{i}".encode(), image=f"{i}.jpg"))
    fake.entry_overrides[1200] = {"hash": "not-an-md5"}
    code, out, err = await run_cli(env, "scrape", "--once")
    assert code == 0, out + err
    by_id = rows()
    assert set(by_id) == set(range(901, 1251)), f"{250 - len(set(by_id) - set(range(901, 1001)))} posts lost"
    assert by_id[1200].state == PostState.failed and "not an md5" in by_id[1200].reason
    assert sum(row.state == PostState.discovered for row in by_id.values()) == 349
    assert cursor_of("miku").newest_id == 1250


async def test_nul_bytes_in_a_listing_are_stored_without_them(scrape_env, fake: FakeSafebooru) -> None:
    """PostgreSQL's text refuses NUL bytes: a listing carrying them is stored without them, on both databases."""
    add_characters(["maki"])
    post = new_post(fake, "maki", "nul")
    fake.entry_overrides[post.id] = {"tags": " maki\x00 solo ", "source": "http://x/\x00y"}
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.errors == [] and report.new == 1
    row = rows()[post.id]
    assert (row.tags, row.source, row.state) == ("maki solo", "http://x/y", PostState.discovered)


async def test_page_failing_mid_walk_leaves_the_cursor_below_the_gap(
    scrape_env, fake: FakeSafebooru, redis_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second page of a three-page gap fails past its retries: the newest page stays stored, the cursor
    stays where it was (below the unstored posts), and the next poll lists the rest (a guard: this held
    before too)."""
    monkeypatch.setenv("WAIFU_API_RETRIES", "0")
    reset_settings_cache()
    add_characters(["maki"])
    first = new_post(fake, "maki", "first")
    await poll_once(get_settings(), enqueue_downloads)
    gap = sorted(new_post(fake, "maki", f"gap{i}").id for i in range(45))
    fake.api_faults.extend(["none", "503"])
    report = await poll_once(get_settings(), enqueue_downloads)
    assert "HTTP 503" in report.errors[0]
    assert set(rows()) == {first.id, *gap[-20:]} and cursor_of("maki").newest_id == first.id
    report = await poll_once(get_settings(), enqueue_downloads)
    assert report.errors == [] and set(rows()) == {first.id, *gap} and cursor_of("maki").newest_id == gap[-1]


# ------------------------------------------------- a bogus id in range does not hide later posts ----
BOGUS_ID = 9_000_000_000  # a post id a BIGINT holds, far above any real one: the probe's


def add_posts(fake: FakeSafebooru, tags: str, ids) -> list[FakePost]:
    return [fake.add(FakePost(id=i, tags=tags, data=f"post{tags}{i}".encode(), image=f"{i}.jpg")) for i in ids]


async def synced_with_bogus_id(scrape_env, fake: FakeSafebooru, redis_client) -> None:
    """Posts 1001..1010 and an entry with id 9,000,000,000 (a valid listing: it is stored), synced: the
    cursor stands at the bogus id, above every real post."""
    add_characters(["miku"])
    add_posts(fake, "miku", [*range(1001, 1011), BOGUS_ID])
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.errors == [] and report.new == 11
    assert cursor_of("miku").newest_id == BOGUS_ID
    redis_client.delete("io")
    fake.requests.clear()


async def test_post_published_after_a_bogus_id_is_stored(scrape_env, fake: FakeSafebooru, redis_client) -> None:
    """The probe: a real post 1300 published after the bogus entry is listed under the cursor. It is no
    row yet and above where the tag's sync reached, so it is wanted: the next poll stores it (before, the
    poll asked `id:>9000000000` and never saw it). Then an idle poll costs one request and stores nothing."""
    await synced_with_bogus_id(scrape_env, fake, redis_client)
    add_posts(fake, "miku", [1300])
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.errors == [] and report.new == 1
    assert set(rows()) == {*range(1001, 1011), BOGUS_ID, 1300}
    assert queued(redis_client) == [1300]
    assert report.tags[0].requests == 1  # a short page: nothing below it to walk to

    redis_client.delete("io")
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.errors == [] and report.new == 0 and report.tags[0].seen == 0
    assert report.tags[0].requests == 1 and redis_client.llen("io") == 0


async def test_burst_published_after_a_bogus_id_is_stored_whole(scrape_env, fake: FakeSafebooru, redis_client) -> None:
    """More than two pages of real posts (1011..1055, 20 a page) published after the bogus entry: every
    page lies under the cursor, and each held posts that are no rows yet, so the walk goes on to the page
    that reaches the synced posts."""
    await synced_with_bogus_id(scrape_env, fake, redis_client)
    add_posts(fake, "miku", range(1011, 1056))
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.errors == [] and report.new == 45
    assert set(rows()) == {*range(1001, 1056), BOGUS_ID}
    assert queued(redis_client) == list(range(1011, 1056))
    assert report.tags[0].requests == 3  # [bogus, 1055..1037], [1036..1017], [1016..1001]: short, the end


async def test_walk_cut_short_under_a_bogus_cursor_resumes_at_the_next_poll(
    scrape_env, fake: FakeSafebooru, redis_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same burst, but the second page fails past its retries. The newest page is stored; at the next
    poll that page lists nothing that is not a row, under a cursor that still stands at the bogus id: a
    cursor left there would end the walk and lose 1011..1036 for good. The cut walk leaves the cursor just
    below the pages it stored, so the next poll walks back down to them and on."""
    monkeypatch.setenv("WAIFU_API_RETRIES", "0")
    reset_settings_cache()
    await synced_with_bogus_id(get_settings(), fake, redis_client)
    add_posts(fake, "miku", range(1011, 1056))
    fake.api_faults.extend(["none", "503"])
    report = await poll_once(get_settings(), enqueue_downloads)
    assert "HTTP 503" in report.errors[0]
    assert set(rows()) == {*range(1001, 1011), *range(1037, 1056), BOGUS_ID}
    assert cursor_of("miku").newest_id == 1036  # under the stored page: the next poll must walk past it

    redis_client.delete("io")
    report = await poll_once(get_settings(), enqueue_downloads)
    assert report.errors == [] and report.new == 26
    assert set(rows()) == {*range(1001, 1056), BOGUS_ID}
    assert queued(redis_client) == list(range(1011, 1037))
    assert cursor_of("miku").newest_id == BOGUS_ID and cursor_of("miku").last_error is None


async def test_without_backfill_a_bogus_id_hides_nothing_and_old_posts_stay_out(
    scrape_env, fake: FakeSafebooru, redis_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WAIFU_BACKFILL_PAGES=0: the sync starts from the newest post (1010) and takes nothing older. A bogus
    entry published later moves the cursor; a real post after it is still stored (it is above where the
    sync started), while the old posts listed beside it on the same page never become rows."""
    monkeypatch.setenv("WAIFU_BACKFILL_PAGES", "0")
    reset_settings_cache()
    add_characters(["miku"])
    add_posts(fake, "miku", range(1001, 1011))
    assert (await poll_once(get_settings(), enqueue_downloads)).new == 0
    add_posts(fake, "miku", [BOGUS_ID])
    assert (await poll_once(get_settings(), enqueue_downloads)).new == 1 and cursor_of("miku").newest_id == BOGUS_ID
    add_posts(fake, "miku", [1300])
    report = await poll_once(get_settings(), enqueue_downloads)
    assert report.errors == [] and report.new == 1
    assert set(rows()) == {BOGUS_ID, 1300}


async def test_idle_poll_costs_one_request_per_tag_and_stores_nothing(
    scrape_env, fake: FakeSafebooru, redis_client
) -> None:
    """The catch-up now asks for the newest page itself (no `id:>` filter): with nothing new that is a
    full page of posts that are rows already, one per tag, and nothing is stored, enqueued or moved — also
    with a bogus id at the top, and with an entry that has no usable id among them (a guard on the cost of
    the fix: one more page, or a refusal, per idle poll would fail it)."""
    tags = ["maki", "riko", "miku"]
    add_characters(tags)
    for n, tag in enumerate(tags):
        add_posts(fake, tag, range(2000 + 100 * n, 2030 + 100 * n))  # 30 each: more than a page of 20
    add_posts(fake, "miku", [BOGUS_ID])
    fake.entry_overrides[2225] = {"id": "not-an-id"}  # on miku's newest page, under the bogus id
    await poll_once(scrape_env, enqueue_downloads)
    before = {tag: cursor_of(tag).newest_id for tag in tags}
    count = len(rows())
    for _ in range(2):
        redis_client.delete("io")
        fake.requests.clear()
        report = await poll_once(scrape_env, enqueue_downloads)
        assert report.errors == []
        assert [t.requests for t in report.tags] == [1, 1, 1]
        assert report.new == 0 and sum(t.seen for t in report.tags) == 0
        assert all("id:>" not in r.query["tags"] for r in fake.api_requests())
        assert redis_client.llen("io") == 0 and len(rows()) == count
        assert {tag: cursor_of(tag).newest_id for tag in tags} == before


async def test_without_backfill_the_sync_starts_below_the_newest_post_with_an_id(
    scrape_env, fake: FakeSafebooru, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WAIFU_BACKFILL_PAGES=0 and the newest entry has no usable id: the sync starts from the newest post
    that has one (it reads a page, not one entry), so the floor stands there and no old post is taken;
    a post published later is."""
    monkeypatch.setenv("WAIFU_BACKFILL_PAGES", "0")
    reset_settings_cache()
    add_characters(["miku"])
    add_posts(fake, "miku", range(1001, 1011))
    fake.entry_overrides[1010] = {"id": "x"}
    report = await poll_once(get_settings(), enqueue_downloads)
    assert report.errors == [] and report.new == 0
    assert cursor_of("miku").newest_id == 1009
    add_posts(fake, "miku", [1011])
    report = await poll_once(get_settings(), enqueue_downloads)
    assert report.errors == [] and set(rows()) == {1011}, "old posts were taken with no backfill"


async def test_stub_under_the_cursor_is_repaired_by_the_tags_own_listing(
    scrape_env, fake: FakeSafebooru, redis_client
) -> None:
    """An entry listed unusable at the first sync is a stub under the cursor. The catch-up lists the newest
    page again, where the site now lists it right: it is filled in and enqueued (before, the catch-up
    asked only above the cursor and never saw it again); a stub still listed unusable stays a stub, and
    neither costs another request."""
    add_characters(["miku"])
    add_posts(fake, "miku", range(1001, 1011))
    fake.entry_overrides[1005] = {"hash": "zzz"}
    fake.entry_overrides[1007] = {"hash": "zzz"}
    await poll_once(scrape_env, enqueue_downloads)
    assert rows()[1005].state == PostState.failed and rows()[1005].md5 == ""
    redis_client.delete("io")
    del fake.entry_overrides[1005]
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.errors == [] and report.new == 1 and report.tags[0].requests == 1
    assert rows()[1005].state == PostState.discovered and rows()[1005].md5 == fake.posts[1005].md5
    assert rows()[1007].state == PostState.failed and queued(redis_client) == [1005]


async def test_a_cursor_kept_before_floors_takes_no_old_posts(scrape_env, fake: FakeSafebooru) -> None:
    """A cursor saved before floors were kept (no `oldest_id`, as a sync with no backfill left it): its floor
    becomes the cursor itself, so the old posts listed on the newest page are not taken (a guard: the
    fallback must not walk back through the tag's history), and a later post is. (A character short of faces
    may still walk back on purpose, a page a poll: that is the deeper backfill's test, off here.)"""
    scrape_env = scrape_env.model_copy(update={"deep_backfill_pages": 0})
    add_characters(["miku"])
    add_posts(fake, "miku", range(1001, 1031))
    with session_scope() as session:
        session.add(ScrapeCursor(site="safebooru", tag="miku", newest_id=1030, backfill_done=True))
    report = await poll_once(scrape_env, enqueue_downloads)
    assert report.errors == [] and report.new == 0 and report.tags[0].requests == 1
    assert cursor_of("miku").oldest_id == 1031
    add_posts(fake, "miku", [1031])
    assert (await poll_once(scrape_env, enqueue_downloads)).new == 1 and set(rows()) == {1031}


@pytest.mark.processes
async def test_scrape_once_cli_stores_a_post_published_after_a_bogus_id(fake: FakeSafebooru, service_env) -> None:
    """The probe through the CLI, default settings: posts 1001..1010 and an entry with id 9,000,000,000
    are synced by one `waifu scrape --once`; a real post 1300 published afterwards becomes a row at the
    next one."""
    from tests.support.cli import run_cli

    env = {**service_env, "WAIFU_DEFAULT_SITE_URL": fake.base_url}
    add_posts(fake, "miku", [*range(1001, 1011), BOGUS_ID])
    assert (await run_cli(env, "characters", "add", "miku"))[0] == 0
    code, out, err = await run_cli(env, "scrape", "--once")
    assert code == 0, out + err
    assert set(rows()) == {*range(1001, 1011), BOGUS_ID}

    add_posts(fake, "miku", [1300])
    code, out, err = await run_cli(env, "scrape", "--once")
    assert code == 0, out + err
    assert 1300 in rows(), "a real post published after the bogus id never became a row"
    assert rows()[1300].state == PostState.discovered


def finish_posts(faces_for: dict[str, int] | None = None) -> None:
    """Every stored post through the pipeline (`done`), and `faces_for[tag]` tag-labelled training faces on
    that tag's posts: what the workers would have left behind."""
    faces_for = faces_for or {}
    with session_scope() as session:
        posts = session.exec(select(Post)).all()
        for post in posts:
            post.state = PostState.done
        for tag, n in faces_for.items():
            tagged = [p for p in posts if tag in p.tags.split()]
            for i in range(n):
                session.add(ready_face(tagged[i % len(tagged)].id, f"faces/{tag}{i}.png", "train", tag, "tag"))


async def test_character_short_of_faces_backfills_deeper_each_poll(
    scrape_env, fake: FakeSafebooru, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 19: a character under WAIFU_MIN_TRAIN_FACES walks one more page of its history each poll once
    its posts are through the pipeline, until its oldest post; one with enough faces, or with posts still in
    flight, does not."""
    monkeypatch.setenv("WAIFU_BACKFILL_PAGES", "1")
    monkeypatch.setenv("WAIFU_DEEP_BACKFILL_PAGES", "1")
    reset_settings_cache()
    add_characters(["maki", "riko"])
    maki = [new_post(fake, "maki", f"maki{i}") for i in range(50)]
    riko = [new_post(fake, "riko", f"riko{i}") for i in range(50)]
    report = await poll_once(get_settings(), enqueue_downloads)
    assert report.new == 40, "the first sync: one page of 20 a tag"

    # maki's posts are still in flight: no deeper walk yet; each tag costs its one catch-up request
    fake.requests.clear()
    report = await poll_once(get_settings(), enqueue_downloads)
    assert report.new == 0 and len(fake.api_requests()) == 2

    # through the pipeline: maki has no face, riko has the minimum
    finish_posts({"riko": get_settings().min_train_faces})
    fake.requests.clear()
    report = await poll_once(get_settings(), enqueue_downloads)
    by_tag = {t.tag: t for t in report.tags}
    assert by_tag["maki"].new == 20 and by_tag["maki"].requests == 2
    assert by_tag["riko"].new == 0 and by_tag["riko"].requests == 1
    assert {p.id for p in maki[-40:]} <= set(rows()) and not {p.id for p in riko[:30]} & set(rows())
    assert not cursor_of("maki").history_done

    # the deeper posts are in flight again: maki waits for them
    report = await poll_once(get_settings(), enqueue_downloads)
    assert report.new == 0
    finish_posts()
    report = await poll_once(get_settings(), enqueue_downloads)
    assert report.new == 10, "the last 10 of maki's 50: a page not full, the tag's oldest"
    assert {p.id for p in maki} <= set(rows()) and cursor_of("maki").history_done
    assert cursor_of("maki").oldest_id == maki[0].id and cursor_of("maki").last_error is None

    # history done: no more walks back, one request per poll again
    finish_posts()
    fake.requests.clear()
    report = await poll_once(get_settings(), enqueue_downloads)
    assert report.new == 0 and len(fake.api_requests()) == 2


async def test_no_deeper_backfill_when_the_first_sync_took_none(
    scrape_env, fake: FakeSafebooru, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WAIFU_BACKFILL_PAGES=0 means "from now on": a character short of faces does not walk back either."""
    monkeypatch.setenv("WAIFU_BACKFILL_PAGES", "0")
    reset_settings_cache()
    add_characters(["maki"])
    for i in range(30):
        new_post(fake, "maki", f"old{i}")
    await poll_once(get_settings(), enqueue_downloads)
    finish_posts()
    fake.requests.clear()
    report = await poll_once(get_settings(), enqueue_downloads)
    assert report.new == 0 and len(fake.api_requests()) == 1 and rows() == {}
