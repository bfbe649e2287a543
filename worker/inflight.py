"""Markers in Redis for messages in flight, so reconcile re-enqueues only what the broker really lost.

A marker says "a message for this row is queued". It is set when a step is enqueued and cleared when a
task takes the message; from then on the row's claim (db.claims) says someone works on it. Markers live
in the broker's own Redis: if Redis loses its messages (restart without persistence, FLUSHALL), it loses
the markers with them, and reconcile sees those rows as orphaned.
"""

from __future__ import annotations

from collections.abc import Iterable

from core.broker import redis_client

# Safety net: a marker whose task vanished without clearing it stops protecting the row after this.
MARKER_TTL_S = 6 * 3600


def _key(kind: str, item_id: int) -> str:
    return f"waifu:inflight:{kind}:{item_id}"


def mark(kind: str, ids: Iterable[int]) -> None:
    pipe = redis_client().pipeline(transaction=False)
    for item_id in ids:
        pipe.set(_key(kind, item_id), 1, ex=MARKER_TTL_S)
    pipe.execute()


def clear(kind: str, item_id: int) -> None:
    redis_client().delete(_key(kind, item_id))


def marked(kind: str, ids: list[int]) -> set[int]:
    if not ids:
        return set()
    pipe = redis_client().pipeline(transaction=False)
    for item_id in ids:
        pipe.exists(_key(kind, item_id))
    return {item_id for item_id, present in zip(ids, pipe.execute(), strict=True) if present}
