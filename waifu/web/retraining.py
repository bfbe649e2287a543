"""The retrain button: enqueue `worker.tasks.retrain` as `waifu retrain` does (one at a time, the same
Redis lock), and read its progress from the Celery result (PROGRESS meta: epoch, epochs, val_accuracy)."""

from __future__ import annotations

from typing import Any

import redis

from core.broker import redis_client
from train.retrain import retrain_running
from worker.steps import JOBS

LAST_TASK_KEY = "waifu:web:last-retrain"  # the task the page follows, for every visitor and after a reload
PRESS_LOCK = "waifu:web:retrain-press"  # two presses at once enqueue one task
WAITING_STATES = ("PENDING", "RECEIVED", "STARTED", "PROGRESS", "RETRY")
UNAVAILABLE = "broker unreachable: retrain unavailable"


class BrokerUnreachable(RuntimeError):
    """Redis (the broker and the result backend) does not answer; the page says so and goes on."""


def _broker_errors():
    from kombu.exceptions import OperationalError

    return (redis.RedisError, OperationalError)


def _result(task_id: str):
    from worker.app import app

    return app.AsyncResult(task_id)


def last_task_id() -> str | None:
    raw = redis_client().get(LAST_TASK_KEY)
    return raw.decode() if raw else None


def start_retrain() -> tuple[bool, str]:
    """(started, what to tell the person). Refused while a retrain runs or one from this page waits.
    Raises BrokerUnreachable when Redis does not answer."""
    try:
        return _start_retrain()
    except _broker_errors() as exc:
        raise BrokerUnreachable(f"{UNAVAILABLE} ({type(exc).__name__})") from exc


def _start_retrain() -> tuple[bool, str]:
    from worker.app import app

    client = redis_client()
    with client.lock(PRESS_LOCK, timeout=10, blocking_timeout=5):
        if retrain_running():
            return False, "a retrain is already running"
        last = last_task_id()
        if last and _result(last).state in WAITING_STATES:
            return False, "a retrain is already queued or running"
        name, _queue = JOBS["retrain"]
        result = app.send_task(name, kwargs={"force": True})
        client.set(LAST_TASK_KEY, result.id, ex=24 * 3600)
    return True, f"retrain enqueued (task {result.id})"


def retrain_status() -> dict[str, Any]:
    """What the page shows: idle, queued, running (with the epoch), done (version, status), failed, or
    unavailable (the broker does not answer: the rest of the page works without it)."""
    try:
        return _retrain_status()
    except _broker_errors() as exc:
        return {"phase": "unavailable", "task": None, "reason": f"{UNAVAILABLE} ({type(exc).__name__})"}


def _retrain_status() -> dict[str, Any]:
    running = retrain_running()
    task_id = last_task_id()
    if task_id is None:
        return {"phase": "running" if running else "idle", "task": None}
    result = _result(task_id)
    state = result.state
    status: dict[str, Any] = {"task": task_id, "state": state}
    if state == "PROGRESS" or (state == "STARTED" and running):
        info = result.info if isinstance(result.info, dict) else {}
        status["phase"] = "running"
        status.update({k: info[k] for k in ("epoch", "epochs", "val_accuracy", "accuracy") if k in info})
        if "phase" in info:  # the trainer's own phase: scratch, head or fine_tune
            status["stage"] = info["phase"]
    elif state in WAITING_STATES:
        status["phase"] = "running" if running else "queued"
    elif state == "SUCCESS":
        summary = result.result if isinstance(result.result, dict) else {}
        status.update(
            phase="done",
            status=summary.get("status"),
            version=summary.get("version"),
            reason=summary.get("reason"),
            accuracy=summary.get("accuracy"),
        )
    else:
        status.update(phase="failed", reason=str(result.result)[:500])
    return status
