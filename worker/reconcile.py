"""Finds rows whose message the broker lost and enqueues them again.

A row is orphaned when it has sat in a non-terminal state longer than `stuck_after` AND no
in-flight marker exists for it (markers vanish with the broker's data, see worker.inflight).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlmodel import col, select

from db.engine import session_scope
from db.models import Face, FaceState, Post, PostState, utcnow
from waifu.logs import kv
from waifu.settings import Settings
from worker import inflight
from worker.enqueue import enqueue_detections, enqueue_downloads, enqueue_resizes

log = logging.getLogger("waifu.reconcile")

# (table, non-terminal state, label in reports, marker kind, enqueue function)
PENDING_STEPS = (
    (Post, PostState.discovered, "discovered", "download", enqueue_downloads),
    (Post, PostState.downloaded, "downloaded", "detect", enqueue_detections),
    (Face, FaceState.detected, "face detected", "resize", enqueue_resizes),
)


def reconcile_stuck(settings: Settings, older_than: float | None = None) -> dict[str, int]:
    """Returns how many rows were re-enqueued per state."""
    cutoff = utcnow() - timedelta(seconds=settings.stuck_after if older_than is None else older_than)
    counts: dict[str, int] = {}
    for table, state, label, kind, enqueue_fn in PENDING_STEPS:
        with session_scope() as session:
            ids = list(session.exec(
                select(table.id).where(table.state == state, col(table.updated_at) <= cutoff).order_by(table.id)
            ).all())
        in_flight = inflight.marked(kind, ids)
        orphaned = [i for i in ids if i not in in_flight]
        if orphaned:
            with session_scope() as session:
                for row in session.exec(select(table).where(col(table.id).in_(orphaned))):
                    row.updated_at = utcnow()
            enqueue_fn(orphaned)
            log.info(kv("reconcile", state=label, requeued=len(orphaned), stale=len(ids)))
        counts[label] = len(orphaned)
    counts["completed"] = complete_finished_posts(cutoff)
    return counts


def complete_finished_posts(cutoff: datetime) -> int:
    """Posts left `detected` although none of their faces waits any more (a lost last step)."""
    from worker.faces import finish_post_if_complete

    done = 0
    with session_scope() as session:
        for post in session.exec(
            select(Post).where(Post.state == PostState.detected, col(Post.updated_at) <= cutoff)
        ).all():
            finish_post_if_complete(session, post)
            done += post.state == PostState.done
    return done


def retry_failed(settings: Settings) -> int:
    """Moves every failed post back to `discovered` and enqueues it (`waifu retry-failed`)."""
    from db.states import transition

    with session_scope() as session:
        failed = session.exec(select(Post).where(Post.state == PostState.failed)).all()
        to_download, to_detect = [], []
        for post in failed:
            # a post whose file is stored failed later, at detection: it resumes there
            resume = PostState.downloaded if post.stored_path else PostState.discovered
            transition(post, resume, reason=f"retry requested after: {post.reason}")
            post.attempts = 0
            (to_detect if post.stored_path else to_download).append(post.id)
    return enqueue_downloads(to_download) + enqueue_detections(to_detect)
