"""Which pipeline step has handed no row on for WAIFU_STALL_AFTER_S seconds while rows wait for it.

Design notes: docs/architecture.md, `waifu/stalls.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, func, or_, text
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from db.claims import as_utc
from db.engine import session_scope
from db.models import Face, FaceState, Post, PostState, utcnow
from worker.steps import QUEUES, STEPS, Step

# PostgreSQL ends any stall query running longer (Docker gives the whole healthcheck 30 s); on SQLite readers
# never wait (WAL) and the queries read an index range, bounded by the rows waiting
QUERY_TIMEOUT_MS = 10_000


def _handed_on(step: str) -> ColumnElement[bool]:
    """Rows a step has taken and moved on: past its waiting state by its own doing."""
    if step == "download":  # every download claim counts an attempt; the scraper's own skips carry none
        return and_(col(Post.state) != PostState.discovered, col(Post.attempts) > 0)
    if step == "detect":  # detected, done, or failed at detection (which keeps the stored file)
        # spelt with NOT IN so that no state index applies: the updated_at index, newest first, answers
        return and_(
            col(Post.state).not_in([PostState.discovered, PostState.downloaded, PostState.skipped]),
            or_(col(Post.state) != PostState.failed, col(Post.stored_path).is_not(None)),
        )
    if step == "crop":
        return col(Face.state).in_([FaceState.ready, FaceState.failed])
    raise KeyError(f"no progress rule for step {step!r}")


@dataclass(frozen=True)
class Stall:
    step: str
    queue: str
    waiting: int  # rows waiting for the step
    noun: str  # what waits: post, face
    since: datetime  # the step's last progress, or when the waiting began if later

    def idle_s(self, now: datetime) -> float:
        return (now - self.since).total_seconds()

    def sentence(self, now: datetime) -> str:
        minutes = int(self.idle_s(now) // 60)
        waits = f"1 {self.noun} waits" if self.waiting == 1 else f"{self.waiting} {self.noun}s wait"
        return f"{self.step} ({self.queue} queue): no progress for {minutes} min while {waits}"

    def as_dict(self, now: datetime) -> dict[str, object]:
        return {
            "step": self.step,
            "queue": self.queue,
            "waiting": self.waiting,
            "since": self.since.isoformat(timespec="seconds"),
            "idle_s": round(self.idle_s(now)),
            "text": self.sentence(now),
        }


def step_stall(session: Session, step: Step, now: datetime, stall_after_s: float) -> Stall | None:
    table = step.table
    cutoff = now - timedelta(seconds=stall_after_s)
    waiting = session.exec(select(func.count()).where(table.state == step.waits_in)).one()  # the state index alone
    if not waiting:
        return None
    # newest first down the updated_at index: on a working step, the first few entries answer
    latest = as_utc(
        session.exec(
            select(table.updated_at).where(_handed_on(step.name)).order_by(col(table.updated_at).desc()).limit(1)
        ).first()
    )
    if latest is not None and latest > cutoff:
        return None
    # only now, with no recent progress: since when does work wait (its arrival, or its last claim or retry)
    oldest = as_utc(session.exec(select(func.min(table.updated_at)).where(table.state == step.waits_in)).one())
    if oldest is None:
        return None  # taken away between the two reads
    since = max(oldest, latest) if latest is not None else oldest
    if since > cutoff:
        return None  # all of it arrived within the limit: not a stall yet
    return Stall(step.name, step.queue, int(waiting), table.__tablename__, since)


def find_stalls(stall_after_s: float, queues: Iterable[str] | None = None, now: datetime | None = None) -> list[Stall]:
    """Stalled steps (of the given queues, else all), in pipeline order. A read-only session: no write lock."""
    now = now or utcnow()
    wanted = None if queues is None else set(queues)
    with session_scope(readonly=True) as session:
        if session.get_bind().dialect.name == "postgresql":  # a check that waits on a sick server ends itself
            session.connection().execute(text(f"SET LOCAL statement_timeout = {QUERY_TIMEOUT_MS}"))
        found = [
            step_stall(session, step, now, stall_after_s)
            for step in STEPS.values()
            if wanted is None or step.queue in wanted
        ]
    return [s for s in found if s is not None]


def stalls_summary(stall_after_s: float) -> list[dict[str, object]]:
    """What the status views show: one dict per stalled step, with its sentence."""
    now = utcnow()
    return [s.as_dict(now) for s in find_stalls(stall_after_s, now=now)]


def stall_problems(stall_after_s: float, queues_text: str) -> list[str]:
    """The healthcheck's lines for `--queues io,cpu`: an unknown queue, or each stalled step on them."""
    queues = [q.strip() for q in queues_text.split(",") if q.strip()]
    unknown = [q for q in queues if q not in QUEUES]
    if unknown:
        return [f"unknown queue {', '.join(unknown)} (known: {', '.join(QUEUES)})"]
    now = utcnow()
    try:
        return [s.sentence(now) for s in find_stalls(stall_after_s, queues, now=now)]
    except SQLAlchemyError as exc:  # one line, as every other healthcheck answer (the caller masks URLs)
        first = (str(exc).strip().splitlines() or [""])[0]
        return [f"stall check failed: {type(exc).__name__}: {first}"]
