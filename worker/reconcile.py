"""Finds rows whose message the broker lost and enqueues them again.

A row is orphaned when it has sat in a non-terminal state longer than `stuck_after` AND no
in-flight marker exists for it (markers vanish with the broker's data, see worker.inflight).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlmodel import col, select

from db.engine import session_scope
from db.models import Post, PostState, utcnow
from waifu.logs import kv
from waifu.settings import Settings
from worker import inflight
from worker.enqueue import enqueue_downloads

log = logging.getLogger("waifu.reconcile")

# non-terminal state -> (marker kind, enqueue function)
PENDING_STEPS = {
    PostState.discovered: ("download", enqueue_downloads),
}


def reconcile_stuck(settings: Settings, older_than: float | None = None) -> dict[str, int]:
    """Returns how many rows were re-enqueued per state."""
    cutoff = utcnow() - timedelta(seconds=settings.stuck_after if older_than is None else older_than)
    counts: dict[str, int] = {}
    for state, (kind, enqueue_fn) in PENDING_STEPS.items():
        with session_scope() as session:
            stale = session.exec(
                select(Post.id).where(Post.state == state, col(Post.updated_at) <= cutoff).order_by(Post.id)
            ).all()
        ids = list(stale)
        in_flight = inflight.marked(kind, ids)
        orphaned = [i for i in ids if i not in in_flight]
        if orphaned:
            with session_scope() as session:
                for post in session.exec(select(Post).where(col(Post.id).in_(orphaned))):
                    post.updated_at = utcnow()
            enqueue_fn(orphaned)
            log.info(kv("reconcile", state=state.value, requeued=len(orphaned), stale=len(ids)))
        counts[state.value] = len(orphaned)
    return counts


def retry_failed(settings: Settings) -> int:
    """Moves every failed post back to `discovered` and enqueues it (`waifu retry-failed`)."""
    from db.states import transition

    with session_scope() as session:
        failed = session.exec(select(Post).where(Post.state == PostState.failed)).all()
        ids = []
        for post in failed:
            transition(post, PostState.discovered, reason=f"retry requested after: {post.reason}")
            post.attempts = 0
            ids.append(post.id)
    return enqueue_downloads(ids)
