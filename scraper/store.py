"""Idempotent upsert of listed posts: one row per safebooru id, linked to every tracked tag it carries."""

from __future__ import annotations

import logging

from sqlmodel import Session, col, select

from core.logs import kv
from db.models import Character, Post, PostCharacter, PostState
from db.states import log as transition_log
from scraper.client import ApiPost, Unusable

ACTIVE_STATES = (PostState.discovered, PostState.downloaded, PostState.detected, PostState.done)

log = logging.getLogger("waifu.scraper.store")


def _skip_reason(api: ApiPost, linked: list[Character], original: int | None) -> str | None:
    if original is not None:
        return f"duplicate of post {original} (same md5 {api.md5})"
    filters = [c.rating_set for c in linked if c.rating_set]
    # a post is kept if any linked character without a filter, or whose filter admits its rating, wants it
    if linked and len(filters) == len(linked) and all(api.rating.lower() not in f for f in filters):
        allowed = sorted(set().union(*filters))
        return f"rating {api.rating or 'unknown'!r} filtered (kept: {', '.join(allowed)})"
    return None


def upsert_posts(session: Session, posts: list[ApiPost], characters: list[Character]) -> list[int]:
    """Inserts new posts and links; returns the ids of new posts that need a download."""
    by_tag = {c.tag: c for c in characters}
    unique = {p.id: p for p in posts}  # the same post twice on one page counts once
    if not unique:
        return []
    existing = {p.id: p for p in session.exec(select(Post).where(col(Post.id).in_(list(unique))))}
    links = {
        (link.post_id, link.character_id)
        for link in session.exec(select(PostCharacter).where(col(PostCharacter.post_id).in_(list(unique))))
    }
    md5s = {p.md5 for p in unique.values()}
    originals = {
        row.md5: row.id
        for row in session.exec(
            select(Post).where(col(Post.md5).in_(list(md5s)), col(Post.state).in_(ACTIVE_STATES)).order_by(Post.id)
        )
        if row.id not in unique
    }

    to_download: list[int] = []
    new_links: list[PostCharacter] = []
    for api in sorted(unique.values(), key=lambda p: p.id):
        linked = [by_tag[t] for t in api.tags.split() if t in by_tag]
        row = existing.get(api.id)
        if row is None:
            reason = _skip_reason(api, linked, originals.get(api.md5))
            row = Post(
                id=api.id, md5=api.md5, file_url=api.file_url, image=api.image, directory=api.directory,
                width=api.width, height=api.height, rating=api.rating, score=api.score, tags=api.tags,
                source=api.source, change=api.change,
                state=PostState.skipped if reason else PostState.discovered, reason=reason,
                duplicate_of=originals.get(api.md5) if reason and "duplicate" in reason else None,
            )
            session.add(row)
            transition_log.info(kv("transition", post=api.id, frm="new", to=row.state, reason=reason))
            if reason is None:
                to_download.append(api.id)
                originals.setdefault(api.md5, api.id)  # a repost later on the same page is a duplicate
        else:
            # what may change on the site; the state belongs to the pipeline
            row.tags, row.score, row.rating, row.change = api.tags, api.score, api.rating, api.change
        for character in linked:
            if (api.id, character.id) not in links:
                new_links.append(PostCharacter(post_id=api.id, character_id=character.id))
                links.add((api.id, character.id))
    session.flush()  # posts first: the links reference them
    session.add_all(new_links)
    session.flush()
    return to_download


def record_unusable(session: Session, entries: list[Unusable]) -> None:
    """A listed entry the API described too badly to use becomes a `failed` row, so status shows it."""
    for entry in entries:
        if entry.id is None or session.get(Post, entry.id) is not None:
            continue
        session.add(Post(id=entry.id, md5="", file_url="", state=PostState.failed, reason=entry.reason))
        transition_log.info(kv("transition", post=entry.id, frm="new", to=PostState.failed.value, reason=entry.reason))
