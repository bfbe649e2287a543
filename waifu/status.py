"""What `waifu status` reports: counts per state and character, common failures, queues, cursors."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from core.settings import Settings
from db.engine import session_scope
from db.models import Character, Face, FaceState, Post, PostCharacter, PostState, ScrapeCursor
from worker.app import QUEUES

TOP_REASONS = 5


def reason_category(reason: str) -> str:
    """Groups reasons that differ only in ids, hashes or numbers ('md5 mismatch: ...' -> 'md5 mismatch')."""
    head = reason.split(":", 1)[0].strip()
    return re.sub(r"\b[0-9a-f]{32}\b|\b\d+\b", "N", head)


def queue_lengths(settings: Settings) -> dict[str, int | None]:
    """Messages waiting per queue, read from Redis (None when the broker cannot be reached)."""
    import redis

    try:
        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=2)
        return {q: int(client.llen(q)) for q in QUEUES}
    except redis.RedisError:
        return dict.fromkeys(QUEUES)


def collect_status(settings: Settings) -> dict[str, Any]:
    with session_scope() as session:
        by_state = dict(session.exec(select(Post.state, func.count()).group_by(Post.state)).all())
        per_character: dict[str, dict[str, int]] = {}
        rows = session.exec(
            select(Character.tag, Post.state, func.count())
            .join(PostCharacter, PostCharacter.character_id == Character.id)
            .join(Post, Post.id == PostCharacter.post_id)
            .group_by(Character.tag, Post.state)
        ).all()
        for tag, state, count in rows:
            per_character.setdefault(tag, {})[state] = count
        for tag in session.exec(select(Character.tag)).all():
            per_character.setdefault(tag, {})
        reasons: Counter[str] = Counter()
        examples: dict[str, str] = {}
        failed_reasons = session.exec(
            select(Post.reason).where(Post.state == PostState.failed, col(Post.reason).is_not(None))
        ).all()
        for reason in failed_reasons:
            category = reason_category(reason)
            reasons[category] += 1
            examples.setdefault(category, reason)
        faces = face_summary(session)
        cursors = [
            {
                "tag": c.tag,
                "newest_id": c.newest_id,
                "oldest_id": c.oldest_id,
                "backfill_done": c.backfill_done,
                "requests": c.requests,
                "last_poll_at": c.last_poll_at.isoformat() if c.last_poll_at else None,
                "last_error": c.last_error,
            }
            for c in session.exec(select(ScrapeCursor).order_by(ScrapeCursor.tag)).all()
        ]
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
        "queues": queue_lengths(settings),
        "cursors": cursors,
    }


def face_summary(session: Session) -> dict[str, Any]:
    """Faces per state, per label source, per character and split; posts where no face was found."""
    by_state = dict(session.exec(select(Face.state, func.count()).group_by(Face.state)).all())
    by_source = dict(session.exec(
        select(Face.label_source, func.count()).where(Face.state == FaceState.ready).group_by(Face.label_source)
    ).all())
    per_label: dict[str, dict[str, int]] = {}
    for label, split, count in session.exec(
        select(Face.label, Face.split, func.count())
        .where(Face.state == FaceState.ready, col(Face.label).is_not(None))
        .group_by(Face.label, Face.split)
    ).all():
        per_label.setdefault(label, {})[split] = int(count)
    no_face = session.exec(select(func.count()).select_from(Post).where(Post.faces == 0)).one()
    duplicates = session.exec(
        select(func.count()).select_from(Face).where(col(Face.duplicate_of).is_not(None))
    ).one()
    return {
        "states": {s.value: int(by_state.get(s.value, 0)) for s in FaceState},
        "label_sources": {str(k): int(v) for k, v in by_source.items() if k},
        "per_character": dict(sorted(per_label.items())),
        "posts_without_face": int(no_face),
        "near_duplicates": int(duplicates),
    }
