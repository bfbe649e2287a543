"""State transitions of posts: every change goes through here, so every change is logged once."""

from __future__ import annotations

import logging

from sqlmodel import Session, col, select

from core.logs import kv
from db.models import Post, PostState, utcnow

log = logging.getLogger("waifu.transition")

MAX_REASON = 2000


def transition(post: Post, new_state: PostState, reason: str | None = None) -> None:
    """Move a post to `new_state` (in the caller's session; the caller commits)."""
    old = post.state
    post.state = new_state
    post.reason = reason[:MAX_REASON] if reason else None
    post.updated_at = utcnow()
    log.info(kv("transition", post=post.id, frm=old, to=new_state.value, reason=post.reason))


def touch(post: Post) -> None:
    """Mark a row as recently handled (reconcile measures staleness from `updated_at`)."""
    post.updated_at = utcnow()


def hand_over_reposts(session: Session, failed: Post) -> int | None:
    """A repost was skipped in favour of `failed`, which never got its file: the earliest repost takes
    its place (back to `discovered`; the caller enqueues it) and the others now wait on that one.
    A duplicate is final only once its original is stored."""
    reposts = list(
        session.exec(
            select(Post).where(Post.duplicate_of == failed.id, Post.state == PostState.skipped).order_by(col(Post.id))
        ).all()
    )
    if not reposts:
        return None
    heir, others = reposts[0], reposts[1:]
    heir.duplicate_of = None
    transition(heir, PostState.discovered, f"original {failed.label} failed ({failed.reason}): collected instead")
    for other in others:
        other.duplicate_of = heir.id
        other.reason = f"duplicate of {heir.label} (same md5 {other.md5})"
    return heir.id


def orphaned_reposts(session: Session) -> list[Post]:
    """Failed originals that still have skipped reposts waiting on them (a repost listed while its
    original failed): reconcile hands them over."""
    failed_ids = select(Post.id).where(Post.state == PostState.failed)
    return list(
        session.exec(
            select(Post).where(
                Post.state == PostState.failed,
                col(Post.id).in_(
                    select(Post.duplicate_of).where(
                        Post.state == PostState.skipped, col(Post.duplicate_of).in_(failed_ids)
                    )
                ),
            )
        ).all()
    )
