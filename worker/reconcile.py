"""Finds rows whose step will never run by itself and enqueues them again.

A row waiting for a step (worker.steps) is orphaned when
- no message for it is queued (no in-flight marker: the broker lost it, or a task died after taking it),
- no worker holds a live claim on it (db.claims: a claim of a killed worker runs out after
  WAIFU_CLAIM_TIMEOUT_S), and
- it has not changed for WAIFU_STUCK_AFTER_S seconds.
So a worker killed mid-step costs at most max(claim timeout, stuck after) + the reconcile interval.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlmodel import col, or_, select

from core.logs import kv
from core.settings import Settings
from db.engine import session_scope
from db.models import Post, PostState, pk, utcnow
from db.states import hand_over_reposts, orphaned_reposts, transition
from worker import inflight
from worker.queue import enqueue
from worker.steps import STEPS

log = logging.getLogger("waifu.reconcile")


def reconcile_stuck(settings: Settings, older_than: float | None = None) -> dict[str, int]:
    """Returns how many rows were re-enqueued per waiting state (and posts completed, reposts handed over)."""
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.stuck_after_s if older_than is None else older_than)
    counts: dict[str, int] = {}
    for step in STEPS.values():
        table = step.table
        with session_scope(readonly=True) as session:
            found = list(
                session.exec(
                    select(table.id)
                    .where(
                        table.state == step.waits_in,
                        col(table.updated_at) <= cutoff,
                        or_(col(table.claimed_until).is_(None), col(table.claimed_until) < now),
                    )
                    .order_by(col(table.id))
                ).all()
            )
        ids = [i for i in found if i is not None]
        in_flight = inflight.marked(step.name, ids)
        orphaned = [i for i in ids if i not in in_flight]
        if orphaned:
            with session_scope() as session:
                for row in session.exec(select(table).where(col(table.id).in_(orphaned))):
                    row.updated_at = utcnow()
            enqueue(step.name, orphaned)
            log.info(kv("reconcile", step=step.name, state=step.waits_in, requeued=len(orphaned), stale=len(ids)))
        counts[label(step)] = len(orphaned)
    counts["completed"] = complete_finished_posts(cutoff)
    counts["reposts"] = hand_over_orphaned_reposts()
    return counts


def label(step) -> str:
    """How reports name a step's waiting rows ("discovered", "downloaded", "face detected")."""
    return f"face {step.waits_in}" if step.table.__tablename__ == "face" else str(step.waits_in)


def complete_finished_posts(cutoff: datetime) -> int:
    """Posts left `detected` although none of their faces waits any more (a lost last step)."""
    from crop.step import finish_post_if_complete

    done = 0
    with session_scope() as session:
        for post in session.exec(
            select(Post).where(Post.state == PostState.detected, col(Post.updated_at) <= cutoff)
        ).all():
            finish_post_if_complete(session, post)
            done += post.state == PostState.done
    return done


def hand_over_orphaned_reposts() -> int:
    """Reposts listed while their original was failing: the earliest one is collected instead."""
    heirs = []
    with session_scope() as session:
        for original in orphaned_reposts(session):
            heir = hand_over_reposts(session, original)
            if heir is not None:
                heirs.append(heir)
    return enqueue("download", heirs)


def retry_failed(settings: Settings) -> int:
    """Moves every failed post back to its waiting state and enqueues it (`waifu retry-failed`)."""
    with session_scope() as session:
        failed = session.exec(select(Post).where(Post.state == PostState.failed)).all()
        to_download: list[int] = []
        to_detect: list[int] = []
        for post in failed:
            # a post whose file is stored failed later, at detection: it resumes there
            resume = PostState.downloaded if post.stored_path else PostState.discovered
            transition(post, resume, reason=f"retry requested after: {post.reason}")
            post.attempts = post.claims = 0
            (to_detect if post.stored_path else to_download).append(pk(post))
    return enqueue("download", to_download) + enqueue("detect", to_detect)
