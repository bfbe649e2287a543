"""Celery tasks: thin shells derived from the step declaration (worker.steps) plus the jobs that are not
per-row steps. A step task calls its plain function and enqueues what the function hands on.

Task names are part of the public contract (Flower's async-apply, the `waifu` CLI, other tools).
"""

from __future__ import annotations

import logging
import random

from billiard.exceptions import TimeLimitExceeded
from celery import Task

from core.logs import kv
from core.settings import get_settings
from db.engine import is_transient
from worker import inflight, limits
from worker.app import app
from worker.queue import enqueue
from worker.steps import JOBS, STEPS, Step

log = logging.getLogger("waifu.tasks")

# a transient database error (SQLite busy, serialization failure, lost connection) is retried this often,
# with jittered exponential backoff, before the row is left to reconcile
DB_RETRIES = 8
DB_BACKOFF_MAX = 60.0


def db_backoff(retries: int) -> float:
    return min(DB_BACKOFF_MAX, 0.5 * 2**retries) * random.uniform(0.5, 1.5)


def run_step(task: Task, step: Step, row_id: int) -> dict:
    """Runs one step for one row; every outcome is on the row, this only moves messages."""
    # The message has arrived: from here the row's claim (db.claims) protects it, not the marker.
    inflight.clear(step.name, row_id)
    try:
        with limits.soft_limit_raises_over_time():
            outcome = step.load()(row_id, get_settings(), token=task.request.id or None)
    except limits.StepOverTime:
        seconds = limits.soft_of(limits.hard_limit(get_settings(), step.task))
        return over_time(step, row_id, task.request.id, seconds)
    except Exception as exc:
        if not is_transient(exc) or task.request.retries >= DB_RETRIES:
            raise  # the row stays where it was; reconcile takes it up again once its claim runs out
        countdown = db_backoff(task.request.retries)
        log.warning(
            kv(
                "database busy, retrying",
                step=step.name,
                row=row_id,
                countdown=round(countdown, 2),
                error=type(exc).__name__,
            )
        )
        inflight.mark(step.name, [row_id])
        raise task.retry(countdown=countdown, exc=exc, max_retries=DB_RETRIES) from exc
    if outcome.retry_in is not None:
        log.info(kv("retry", step=step.name, row=row_id, countdown=round(outcome.retry_in, 2)))
        inflight.mark(step.name, [row_id])
        raise task.retry(countdown=outcome.retry_in, max_retries=None)
    if outcome.next_ids and step.next:
        enqueue(step.next, outcome.next_ids)  # committed by the step: the next one may start
    if outcome.again_ids:
        enqueue(step.name, outcome.again_ids)
    return {"state": outcome.state, "next": len(outcome.next_ids), "reason": outcome.reason, "work": outcome.work}


def over_time(step: Step, row_id: int, token: str | None, seconds: float) -> dict:
    """The row counts a timed-out attempt: it is tried again, or fails once its attempts are spent."""
    from db.claims import over_time as record

    again = token is not None and record(step.table, row_id, step.waits_in, token, seconds)
    log.warning(kv("time limit", step=step.name, row=row_id, seconds=seconds, again=again))
    if again:
        enqueue(step.name, [row_id])
    return {"state": "over time", "next": 0, "reason": f"over {seconds:g} s", "work": None}


class StepTask(Task):
    """A step's task: a hard time limit ends its process before any code of ours runs there, so the worker's
    main process records it on the row (Celery calls on_failure there) and enqueues the row again."""

    step: Step

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        if isinstance(exc, TimeLimitExceeded) and args:
            over_time(self.step, int(args[0]), task_id, limits.hard_limit(get_settings(), self.name))


def _register(step: Step, name: str) -> Task:
    def shell(self: Task, row_id: int) -> dict:
        return run_step(self, step, row_id)

    shell.__name__ = shell.__qualname__ = step.name
    shell.__doc__ = f"Step `{step.name}` for one {step.table.__tablename__} row (queue `{step.queue}`)."
    return app.task(name=name, bind=True, max_retries=None, base=StepTask, step=step)(shell)


# each step under its task name, and under its earlier names (a message sent to one runs the same step)
STEP_TASKS = {name: _register(step, name) for step in STEPS.values() for name in step.task_names}


@app.task(name=JOBS["reconcile"].task)
def reconcile() -> dict[str, int]:
    """Re-enqueue rows stuck in a waiting state whose message was lost or whose worker died (beat)."""
    from worker.reconcile import reconcile_stuck

    return reconcile_stuck(get_settings())


def _retrain_outcome(force: bool, progress=None, loop_round: int = 0, first_only: bool = False) -> dict:
    from train.retrain import NotEnoughData, RetrainBusy, run_retrain, should_retrain
    from train.selftrain import follow_up
    from worker.retrain_request import schedule_follow_up

    settings = get_settings()
    if not force:
        go, why = should_retrain(settings, first_only)
        if not go:
            return {"status": "skipped", "reason": why}
    try:
        summary = run_retrain(settings, progress=progress, loop_round=loop_round)
    except RetrainBusy as exc:
        return {"status": "busy", "reason": str(exc)}
    except NotEnoughData as exc:
        return {"status": "skipped", "reason": str(exc)}
    if summary["status"] == "current":
        app.send_task(JOBS["classify"].task)  # a new model: refresh the suggestions on ambiguous faces
    # the self-training loop: the inferred labels moved enough that a retrain on them may do better
    go, why = follow_up(summary, loop_round, settings)
    summary["follow_up"] = {"scheduled": go, "reason": why}
    if go:
        summary["follow_up"]["task"] = schedule_follow_up(loop_round + 1)
    log.info(kv("retrain follow-up", scheduled=go, round=loop_round, reason=why))
    return summary


@app.task(name=JOBS["classify"].task)
def classify(face_ids: list[int] | None = None) -> int:
    """The current model's suggestion for ambiguous faces (queue `train`: TensorFlow stays in one process)."""
    from predict.suggest import suggest_for_ambiguous

    return suggest_for_ambiguous(get_settings(), face_ids)


@app.task(name=JOBS["retrain"].task, bind=True)
def retrain(self, force: bool = True, loop_round: int = 0) -> dict:
    """Train, evaluate against the current model, promote if better (queue `train`, solo pool).

    Flower: `POST /api/task/async-apply/worker.tasks.retrain`. One at a time: a second answers `busy`.
    `loop_round` > 0: a follow-up the self-training loop scheduled (train.selftrain).
    """

    def progress(info: dict) -> None:
        self.update_state(state="PROGRESS", meta={k: v for k, v in info.items() if isinstance(v, int | float | str)})

    return _retrain_outcome(force, progress, loop_round)


@app.task(name=JOBS["maybe_retrain"].task)
def maybe_retrain(first_only: bool = False) -> dict:
    """The beat trigger: retrains only when enough new labelled faces arrived (queue `train`). `first_only`:
    the frequent check for a new collection's first model, which does nothing once any version exists."""
    return _retrain_outcome(force=False, first_only=first_only)
