"""Idempotent upsert of listed posts: one row per (site, remote id), linked to every tracked character of
that site whose tag it carries.

An entry the API described too badly to use becomes a `failed` stub (no md5, no URL) with the reason; when
the same post is listed correctly later (by the same tag, another tag, a backfill), the stub is filled in
and goes to `discovered` like a new post."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random

from core.logs import kv
from db.engine import is_transient, session_scope
from db.models import Character, Post, PostCharacter, PostState, pk, utcnow
from db.states import log as transition_log
from scraper.client import ApiPost, Unusable

# a listed file already held by a post in one of these states is a repost; a failed one gives it up
ACTIVE_STATES = (PostState.discovered, PostState.downloaded, PostState.detected, PostState.done)

log = logging.getLogger("waifu.scraper.store")


def _skip_reason(api: ApiPost, linked: list[Character], original: Post | None) -> str | None:
    if original is not None:
        return f"duplicate of {original.label} (same md5 {api.md5})"
    filters = [c.rating_set for c in linked if c.rating_set]
    # a post is kept if any linked character without a filter, or whose filter admits its rating, wants it
    if linked and len(filters) == len(linked) and all(api.rating.lower() not in f for f in filters):
        allowed = sorted(set().union(*filters))
        return f"rating {api.rating or 'unknown'!r} filtered (kept: {', '.join(allowed)})"
    return None


def is_stub(row: Post) -> bool:
    """A row made from an unusable listing (record_unusable), waiting for a correct one."""
    return _stub(row.state, row.md5, row.file_url)


def _stub(state: str, md5: str, file_url: str) -> bool:
    return state == PostState.failed and not (md5 and file_url)


def _fill(row: Post, api: ApiPost) -> None:
    row.md5, row.file_url, row.image, row.directory = api.md5, api.file_url, api.image, api.directory
    row.width, row.height, row.rating, row.score = api.width, api.height, api.rating, api.score
    row.tags, row.source, row.change = api.tags, api.source, api.change
    row.updated_at = utcnow()


def upsert_posts(session: Session, site: str, posts: list[ApiPost], characters: list[Character]) -> list[int]:
    """Inserts new posts of `site` and their links; returns the ids of new posts that need a download."""
    by_tag = {c.tag: c for c in characters if c.site == site}
    unique = {p.id: p for p in posts}  # the same post twice on one page counts once
    if not unique:
        return []
    existing = {
        p.remote_id: p
        for p in session.exec(select(Post).where(Post.site == site, col(Post.remote_id).in_(list(unique))))
    }
    links = {
        (link.post_id, link.character_id)
        for link in session.exec(
            select(PostCharacter).where(col(PostCharacter.post_id).in_([p.id for p in existing.values()]))
        )
    }
    # the same file from any site is one picture: md5 decides, whatever the site
    originals = {
        row.md5: row
        for row in session.exec(
            select(Post)
            .where(col(Post.md5).in_(list({p.md5 for p in unique.values()})), col(Post.state).in_(ACTIVE_STATES))
            .order_by(col(Post.id))
        )
        if not (row.site == site and row.remote_id in unique)
    }

    to_download: list[int] = []
    new_links: list[tuple[Post, Character]] = []
    for api in sorted(unique.values(), key=lambda p: p.id):
        linked = [by_tag[t] for t in api.tags.split() if t in by_tag]
        row = existing.get(api.id)
        if row is None or is_stub(row):
            frm = "new" if row is None else row.state
            if row is None:
                row = Post(site=site, remote_id=api.id, md5="", file_url="")
                session.add(row)
            reason = _skip_reason(api, linked, originals.get(api.md5))
            _fill(row, api)
            row.state = PostState.skipped if reason else PostState.discovered
            row.reason, row.attempts = reason, 0
            row.duplicate_of = originals[api.md5].id if reason and "duplicate" in reason else None
            session.flush()  # its id: links, logs and later reposts on this page refer to it
            transition_log.info(
                kv("transition", post=row.id, site=site, remote=api.id, frm=frm, to=row.state, reason=reason)
            )
            if reason is None:
                to_download.append(pk(row))
                originals.setdefault(api.md5, row)  # a repost later on the same page is a duplicate
        else:
            # what may change on the site; the state belongs to the pipeline
            row.tags, row.score, row.rating, row.change = api.tags, api.score, api.rating, api.change
        new_links += [(row, character) for character in linked if (pk(row), pk(character)) not in links]
    session.add_all(PostCharacter(post_id=pk(row), character_id=pk(character)) for row, character in new_links)
    session.flush()
    return to_download


def rows_listed(site: str, remote_ids: Iterable[int]) -> dict[int, bool]:
    """Which of these post ids of `site` are rows already: remote id -> whether the row is a stub waiting
    for a correct listing (is_stub)."""
    wanted = sorted(set(remote_ids))
    if not wanted:
        return {}
    with session_scope(readonly=True) as session:
        found = session.exec(
            select(Post.remote_id, Post.state, Post.md5, Post.file_url).where(
                Post.site == site, col(Post.remote_id).in_(wanted)
            )
        )
        return {remote: _stub(state, md5, url) for remote, state, md5, url in found if remote is not None}


def _worth_another_go(error: BaseException) -> bool:
    return isinstance(error, IntegrityError) or is_transient(error)


def store_listed(
    site: str, posts: list[ApiPost], characters: list[Character], unusable: Iterable[Unusable] = ()
) -> list[int]:
    """A listed page in one transaction, committed: `upsert_posts`, then a stub for each unusable entry
    that has an id and no row yet. Returns the ids to enqueue (new posts and repaired stubs).

    A post carrying two tracked tags is listed by both tags' pollers at the same time: on PostgreSQL both
    may insert it, and the second commit meets the unique (site, remote id) or (post, character). Run
    again, the upsert finds the other's rows and adds only what is missing."""
    unusable = list(unusable)
    for attempt in Retrying(
        retry=retry_if_exception(_worth_another_go),
        stop=stop_after_attempt(5),
        wait=wait_random(0.05, 0.5),
        reraise=True,
    ):
        with attempt, session_scope() as session:
            new_ids = upsert_posts(session, site, posts, characters)
            record_unusable(session, site, unusable)
    return new_ids


def record_unusable(session: Session, site: str, entries: list[Unusable]) -> None:
    """A listed entry the API described too badly to use becomes a `failed` stub, so status shows it; a
    post that has a row keeps it as it is (a bad listing never spoils a good row)."""
    for entry in entries:
        if (
            entry.id is None
            or session.exec(select(Post.id).where(Post.site == site, Post.remote_id == entry.id)).first() is not None
        ):
            continue
        row = Post(site=site, remote_id=entry.id, md5="", file_url="", state=PostState.failed, reason=entry.reason)
        session.add(row)
        session.flush()
        transition_log.info(
            kv(
                "transition",
                post=row.id,
                site=site,
                remote=entry.id,
                frm="new",
                to=PostState.failed.value,
                reason=entry.reason,
            )
        )
