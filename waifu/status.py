"""What `waifu status` reports: counts per state and character, common failures, queues, cursors."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select

from db.engine import session_scope
from db.models import Character, Post, PostCharacter, PostState, ScrapeCursor
from waifu.settings import Settings
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
        "queues": queue_lengths(settings),
        "cursors": cursors,
    }
