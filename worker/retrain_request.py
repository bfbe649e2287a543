"""The one way to ask for a retrain, for the CLI and the web page alike: at most one queued or running.

A request is refused while a retrain holds its lock or while the last requested task still waits; the
last request's task id is kept in Redis so every client (CLI, page, another terminal) sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from core.broker import redis_client
from worker.steps import JOBS

LAST_TASK_KEY = "waifu:retrain:last-task"  # the retrain last requested, for every client and after a reload
REQUEST_LOCK = "waifu:retrain:request-lock"  # two requests at once enqueue one task
WAITING_STATES = ("PENDING", "RECEIVED", "STARTED", "PROGRESS", "RETRY")
# kombu's Redis transport keeps a message a worker has taken here until it is acked (task_acks_late: when the
# task ends), so a retrain taken but not yet started is found in it
UNACKED_KEY = "unacked"


@dataclass(frozen=True)
class RetrainRequest:
    started: bool
    message: str  # what to tell the person
    task_id: str | None  # the task enqueued now, or the one already waiting or running


def last_task_id() -> str | None:
    raw = cast("bytes | None", redis_client().get(LAST_TASK_KEY))  # redis-py types replies as sync-or-async
    return raw.decode() if raw else None


def _queued_or_held(client, queue: str, task_id: str) -> bool:
    if cast(int, client.llen(queue)) > 0:
        return True
    held = cast("list[bytes]", client.hvals(UNACKED_KEY))
    return any(task_id.encode() in message for message in held)


def request_retrain(force: bool) -> RetrainRequest:
    """Enqueue the retrain job (JOBS["retrain"]) unless one is queued or running. Raises the broker's errors (redis,
    kombu) when Redis does not answer."""
    from train.retrain import retrain_running
    from worker.app import app

    client = redis_client()
    with client.lock(REQUEST_LOCK, timeout=10, blocking_timeout=5):
        last = last_task_id()
        if retrain_running():
            return RetrainRequest(False, "a retrain is already running", last)
        job = JOBS["retrain"]
        # a PENDING task that is in no queue, held by no worker and not running was lost (a flushed broker):
        # ask again
        if last and app.AsyncResult(last).state in WAITING_STATES and _queued_or_held(client, job.queue, last):
            return RetrainRequest(False, "a retrain is already queued or running", last)
        result = app.send_task(job.task, kwargs={"force": force})
        client.set(LAST_TASK_KEY, result.id, ex=24 * 3600)
    return RetrainRequest(True, f"retrain enqueued (task {result.id})", result.id)


def schedule_follow_up(loop_round: int) -> str:
    """Enqueue a follow-up retrain of the self-training loop (force: no new labels needed) as the last
    requested retrain, so the CLI and the web page see it waiting. Returns its task id."""
    from worker.app import app

    result = app.send_task(JOBS["retrain"].task, kwargs={"force": True, "loop_round": loop_round})
    redis_client().set(LAST_TASK_KEY, result.id, ex=24 * 3600)
    return result.id
