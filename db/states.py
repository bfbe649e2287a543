"""State transitions of posts: every change goes through here, so every change is logged once."""

from __future__ import annotations

import logging

from db.models import Post, PostState, utcnow
from waifu.logs import kv

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
