"""Claim a row, work with no transaction open, then commit only if the row is still where we left it.

Design notes: docs/architecture.md, `db/claims.py`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from sqlmodel import Session

from core import faults
from core.logs import kv
from core.outcome import StepOutcome
from core.settings import get_settings
from db.engine import session_scope
from db.models import Face, FaceState, Post, PostState, utcnow

log = logging.getLogger("waifu.claims")

# the tables a step claims rows of: both carry state, reason and the claim columns
Row = TypeVar("Row", Post, Face)


def new_token() -> str:
    """A token for a caller outside Celery (the CLI, tests); tasks use their task id."""
    return f"local-{uuid.uuid4().hex}"


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC), PostgreSQL aware ones: compare them as UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def held_by_other(row: Post | Face, token: str, now: datetime) -> bool:
    until = as_utc(row.claimed_until)
    return row.claim_token not in (None, token) and until is not None and until > now


# how a row's reason names the step that waits on it: (table, state it waits in) -> words
STEP_WORDS: dict[tuple[str, str], str] = {
    ("post", PostState.discovered): "the download",
    ("post", PostState.downloaded): "face detection",
    ("face", FaceState.detected): "the face crop",
}

# every reason a time limit writes contains this: `waifu status` counts the rows by it
OVER_TIME_MARK = "did not finish within"
CRASH_MARK = "crashed its worker"


def step_words(table: type[Post | Face], state: str) -> str:
    return STEP_WORDS.get((table.__tablename__, state), f"the step on a {state} {table.__tablename__}")


def attempts_text(count: int, limit: int | None = None) -> str:
    return f"attempt {count} of {limit}" if limit is not None else f"{count} attempt{'s' * (count != 1)}"


def fail_row(row: Post | Face, reason: str) -> None:
    """Ends a row in `failed` with `reason` (in the caller's transaction), its claim dropped."""
    from db.states import transition

    row.claim_token, row.claimed_until = None, None
    if isinstance(row, Post):
        transition(row, PostState.failed, reason)
        return
    row.state, row.reason, row.updated_at = FaceState.failed, reason[:2000], utcnow()
    log.warning(kv("failed", table=row.__tablename__, row=row.id, reason=row.reason))


def max_attempts() -> int:
    return get_settings().max_attempts


def claim(
    table: type[Row],
    row_id: int,
    state: str,
    token: str,
    seconds: float,
    on_claim: Callable[[Session, Row], None] | None = None,
) -> Row | None:
    """The row, detached, if it is in `state` and free (or ours): claimed for `seconds`. Else None.

    `on_claim` runs in the claiming transaction (count an attempt, settle a duplicate at once); if it
    moves the row out of `state`, the claim is dropped and the row comes back in its new state."""
    now = utcnow()
    with session_scope() as session:
        row = session.get(table, row_id, with_for_update=True)
        if row is None or row.state != state or held_by_other(row, token, now):
            return None
        if row.claims >= max_attempts():
            # every earlier delivery ended with no outcome and no time limit said why: the worker died
            fail_row(
                row,
                f"{step_words(table, state)} {CRASH_MARK} {row.claims} times (out of memory, killed, or the "
                f"worker stopped mid-step): given up after {attempts_text(row.claims)}",
            )
            return None
        row.claims += 1
        row.claim_token, row.claimed_until, row.updated_at = token, now + timedelta(seconds=seconds), now
        if on_claim is not None:
            on_claim(session, row)
            if row.state != state:
                row.claim_token, row.claimed_until, row.claims = None, None, 0
        session.flush()
        session.expunge(row)
    faults.after_claim(table.__tablename__, state)  # tests only (core.faults); committed first, as a real crash
    return row


def peek(table: type[Row], row_id: int) -> Row | None:
    """The row as it is now (detached), to tell a caller why a claim was refused."""
    with session_scope(readonly=True) as session:
        row = session.get(table, row_id)
        if row is not None:
            session.expunge(row)
        return row


def state_of(table: type[Row], row_id: int) -> StepOutcome:
    """Where a row stands now, as a step's outcome: what a step answers when its row is not (or no longer) its own."""
    row = peek(table, row_id)
    if row is None:
        return StepOutcome(None, reason=f"no such {table.__tablename__}")
    states = FaceState if table is Face else PostState
    return StepOutcome(states(row.state), row.reason)


@contextmanager
def still_claimed(
    table: type[Row], row_id: int, state: str, token: str, keep: bool = False
) -> Iterator[tuple[Session, Row | None]]:
    """A short transaction on the row if it is still in `state` under our claim (else the row is None and
    nothing may be written). The claim is released when the block ends without an error, unless `keep`."""
    with session_scope() as session:
        row = session.get(table, row_id, with_for_update=True)
        if row is None or row.state != state or row.claim_token != token:
            log.info(
                kv(
                    "claim lost",
                    table=table.__tablename__,
                    row=row_id,
                    token=token,
                    state=None if row is None else row.state,
                )
            )
            yield session, None
            return
        yield session, row
        row.claims = 0  # an outcome: the next step starts its own count
        if not keep:
            row.claim_token, row.claimed_until = None, None


def release(table: type[Row], row_id: int, token: str, reason: str | None = None) -> None:
    """Gives a claim back without changing the state (work to be retried later); records `reason`."""
    with session_scope() as session:
        row = session.get(table, row_id, with_for_update=True)
        if row is None or row.claim_token != token:
            return
        row.claim_token, row.claimed_until, row.updated_at = None, None, utcnow()
        row.claims = 0  # an outcome ("later"): the delivery did not die
        if reason is not None:
            row.reason = reason[:2000]


def over_time(table: type[Post] | type[Face], row_id: int, state: str, token: str, seconds: float) -> bool:
    """A delivery under our claim ran out of time. Fails the row once its attempts are spent ("face detection
    did not finish within 60 s (3 attempts)"); else gives the claim back with the reason, and True: enqueue
    it again. A row no longer ours (or no longer waiting) is left alone."""
    with session_scope() as session:
        row = session.get(table, row_id, with_for_update=True)
        if not isinstance(row, Post | Face) or row.state != state:  # None: gone (the check also narrows)
            return False
        if row.claim_token != token:
            # not claimed by this delivery (it ran out of time before its claim): enqueue it again if no one
            # holds it; a duplicate message finds it claimed and costs nothing
            return row.claim_token is None
        what, limit = step_words(table, state), max_attempts()
        if row.claims >= limit:
            fail_row(row, f"{what} {OVER_TIME_MARK} {seconds:g} s ({attempts_text(row.claims)})")
            return False
        row.claim_token, row.claimed_until, row.updated_at = None, None, utcnow()
        row.reason = f"{what} {OVER_TIME_MARK} {seconds:g} s ({attempts_text(row.claims, limit)}); tried again"
        log.warning(kv("over time", table=table.__tablename__, row=row_id, seconds=seconds, claims=row.claims))
        return True
