"""What `waifu status` reports: counts per state and character, common failures, queues, cursors.

`collect_status` is the one status query: `waifu status`, the web page and `waifu run`'s live screen all
read it. It opens a read-only session, so a screen redrawn every few seconds never takes SQLite's write lock.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, timedelta
from typing import Any, cast

from sqlalchemy import func
from sqlmodel import Session, col, select

from core.settings import Settings
from core.sites import DEFAULT_SITE
from db.engine import session_scope
from db.models import (
    Character,
    Face,
    FaceState,
    LabelSource,
    ModelVersion,
    Post,
    PostCharacter,
    PostState,
    ScrapeCursor,
)
from train.characters import character_report
from train.registry import current_version
from waifu.stalls import stalls_summary
from worker.app import QUEUES

TOP_REASONS = 5
RECENT_FAILURES = 50  # the latest failed rows that `recent_failures` groups


def reason_category(reason: str) -> str:
    """Groups reasons that differ only in ids, hashes or numbers ('md5 mismatch: ...' -> 'md5 mismatch')."""
    head = reason.split(":", 1)[0].strip()
    return re.sub(r"\b[0-9a-f]{32}\b|\b\d+\b", "N", head)


def queue_lengths(settings: Settings) -> dict[str, int | None]:
    """Messages waiting per queue, read from Redis (None when the broker cannot be reached)."""
    import redis

    try:
        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=2)
        return {q: int(cast(int, client.llen(q))) for q in QUEUES}  # redis-py types replies as sync-or-async
    except redis.RedisError:
        return dict.fromkeys(QUEUES)


def character_key(site: str, tag: str) -> str:
    """A character as status shows it: the tag alone on the default site, `site:tag` on the others."""
    return tag if site == DEFAULT_SITE else f"{site}:{tag}"


def collect_status(settings: Settings) -> dict[str, Any]:
    with session_scope(readonly=True) as session:
        by_state = dict(session.exec(select(Post.state, func.count()).group_by(col(Post.state))).all())
        per_character: dict[str, dict[str, int]] = {}
        rows = session.exec(
            select(Character.site, Character.tag, Post.state, func.count())
            .join(PostCharacter, col(PostCharacter.character_id) == Character.id)
            .join(Post, col(Post.id) == PostCharacter.post_id)
            .group_by(col(Character.site), col(Character.tag), col(Post.state))
        ).all()
        for site, tag, state, count in rows:
            per_character.setdefault(character_key(site, tag), {})[state] = count
        for site, tag in session.exec(select(Character.site, Character.tag)).all():
            per_character.setdefault(character_key(site, tag), {})
        reasons: Counter[str] = Counter()
        examples: dict[str, str] = {}
        failed_reasons = session.exec(
            select(Post.reason).where(Post.state == PostState.failed, col(Post.reason).is_not(None))
        ).all()
        for reason in failed_reasons:
            if reason is None:  # selected not null
                continue
            category = reason_category(reason)
            reasons[category] += 1
            examples.setdefault(category, reason)
        faces = face_summary(session)
        characters_model = character_report(session, settings)
        models = model_summary(session)
        cursor_rows = session.exec(select(ScrapeCursor).order_by(col(ScrapeCursor.site), col(ScrapeCursor.tag))).all()
        cursors = [
            {
                "site": c.site,
                "tag": c.tag,
                "newest_id": c.newest_id,
                "oldest_id": c.oldest_id,
                "backfill_done": c.backfill_done,
                "history_done": c.history_done,
                "requests": c.requests,
                "last_poll_at": c.last_poll_at.isoformat() if c.last_poll_at else None,
                "last_error": c.last_error,
            }
            for c in cursor_rows
        ]
        recent = recent_failures(session)
        time_limits = time_limit_counts(session)
        last_polls = [c.last_poll_at for c in cursor_rows if c.last_poll_at]
    # the poller waits poll_interval_s after a whole pass, and a pass ends with its last tag
    next_poll = None
    if last_polls:
        last = max(last_polls)
        next_poll = (last if last.tzinfo else last.replace(tzinfo=UTC)) + timedelta(seconds=settings.poll_interval_s)
    return {
        "posts": {s.value: int(by_state.get(s.value, 0)) for s in PostState},
        "total": int(sum(by_state.values())),
        "characters": {
            tag: {s: int(n) for s, n in sorted(states.items())} for tag, states in sorted(per_character.items())
        },
        "failure_reasons": [
            {"reason": cat, "count": n, "example": examples[cat]} for cat, n in reasons.most_common(TOP_REASONS)
        ],
        "faces": faces,
        # per character: faces available, train (tag and manual; inferred apart), test, F1 of the current model
        "recognition": characters_model,
        "model": models,
        "queues": queue_lengths(settings),
        "cursors": cursors,
        "recent_failures": recent,
        "time_limits": time_limits,
        "next_poll_at": next_poll.isoformat(timespec="seconds") if next_poll else None,
        "stalls": stalls_summary(settings.stall_after_s),
    }


def time_limit_counts(session: Session) -> dict[str, int]:
    """Rows (posts and faces) a time limit or a dying worker stopped (db.claims): failed for it, or waiting
    for another try after it. Operators must see hangs."""
    from db.claims import CRASH_MARK, OVER_TIME_MARK

    def count(table, mark: str, failed: bool) -> int:
        state = col(table.state) == "failed" if failed else col(table.state) != "failed"
        query = select(func.count()).select_from(table).where(state, col(table.reason).contains(mark))
        return int(session.exec(query).one())

    return {
        "failed": sum(count(t, OVER_TIME_MARK, True) for t in (Post, Face)),
        "retrying": sum(count(t, OVER_TIME_MARK, False) for t in (Post, Face)),
        "crashed": sum(count(t, CRASH_MARK, True) for t in (Post, Face)),
    }


def recent_failures(session: Session, limit: int = RECENT_FAILURES) -> list[dict[str, Any]]:
    """The latest failed posts and faces grouped by reason: what goes wrong now, newest group first."""
    rows = [
        ("post", reason, at)
        for reason, at in session.exec(
            select(Post.reason, Post.updated_at)
            .where(Post.state == PostState.failed)
            .order_by(col(Post.updated_at).desc())
            .limit(limit)
        ).all()
    ]
    rows += [
        ("face", reason, at)
        for reason, at in session.exec(
            select(Face.reason, Face.updated_at)
            .where(Face.state == FaceState.failed)
            .order_by(col(Face.updated_at).desc())
            .limit(limit)
        ).all()
    ]
    rows.sort(key=lambda r: r[2], reverse=True)
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, reason, at in rows[:limit]:
        key = (kind, reason_category(reason or "no reason recorded"))
        group = groups.setdefault(
            key,
            {
                "kind": kind,
                "reason": key[1],
                "count": 0,
                "last_at": at.isoformat(timespec="seconds"),
                "example": reason or "",
            },
        )
        group["count"] += 1
    return list(groups.values())


def face_summary(session: Session) -> dict[str, Any]:
    """Faces per state, per label source, per character and split (tag and manual labels; inferred ones
    apart), doubtful tag labels; posts where no face was found."""
    by_state = dict(session.exec(select(Face.state, func.count()).group_by(col(Face.state))).all())
    by_source = dict(
        session.exec(
            select(Face.label_source, func.count())
            .where(Face.state == FaceState.ready)
            .group_by(col(Face.label_source))
        ).all()
    )
    per_label: dict[str, dict[str | None, int]] = {}  # split None: not split yet
    inferred: dict[str, int] = {}
    for label, source, split, count in session.exec(
        select(Face.label, Face.label_source, Face.split, func.count())
        .where(Face.state == FaceState.ready, col(Face.label).is_not(None))
        .group_by(col(Face.label), col(Face.label_source), col(Face.split))
    ).all():
        if label is None:  # selected not null
            continue
        if source == LabelSource.inferred:  # the model's own guesses: counted apart from tag and manual labels
            inferred[label] = inferred.get(label, 0) + int(count)
        else:
            per_label.setdefault(label, {})[split] = per_label.get(label, {}).get(split, 0) + int(count)
    doubtful = session.exec(
        select(func.count()).select_from(Face).where(Face.state == FaceState.ready, col(Face.doubt_score).is_not(None))
    ).one()
    no_face = session.exec(select(func.count()).select_from(Post).where(Post.faces == 0)).one()
    duplicates = session.exec(select(func.count()).select_from(Face).where(col(Face.duplicate_of).is_not(None))).one()
    return {
        "states": {s.value: int(by_state.get(s.value, 0)) for s in FaceState},
        "label_sources": {str(k): int(v) for k, v in by_source.items() if k},
        "per_character": dict(sorted(per_label.items())),  # tag and manual labels per split
        "inferred_per_character": dict(sorted(inferred.items())),
        "doubtful": int(doubtful),  # tag labels a model trained without them doubts (labels.weak)
        "posts_without_face": int(no_face),
        "near_duplicates": int(duplicates),
    }


def _version(v: ModelVersion | None) -> dict[str, Any] | None:
    if v is None:
        return None
    return {
        "version": v.id,
        "status": v.status,
        "accuracy": v.accuracy,
        "macro_f1": v.macro_f1,
        "loop_round": v.loop_round,
        "reason": v.reason,
        "created_at": v.created_at.isoformat(timespec="seconds"),
    }


def model_summary(session: Session) -> dict[str, Any]:
    """The model predictions use, and the latest retrain when it is another (a candidate, a failure)."""
    current = current_version(session)
    latest = session.exec(select(ModelVersion).order_by(col(ModelVersion.id).desc())).first()
    return {"current": _version(current), "latest": None if latest is current else _version(latest)}
