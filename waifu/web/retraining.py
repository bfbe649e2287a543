"""The retrain button: worker.retrain_request, as `waifu retrain` asks (one queued or running at a time),
and its progress read from the Celery result (PROGRESS meta: epoch, epochs, val_accuracy)."""

from __future__ import annotations

from typing import Any

import redis

from train.retrain import retrain_running
from worker.retrain_request import WAITING_STATES, last_task_id, request_retrain

UNAVAILABLE = "broker unreachable: retrain unavailable"


class BrokerUnreachable(RuntimeError):
    """Redis (the broker and the result backend) does not answer; the page says so and goes on."""


def _broker_errors():
    from kombu.exceptions import OperationalError

    return (redis.RedisError, OperationalError)


def _result(task_id: str):
    from worker.app import app

    return app.AsyncResult(task_id)


def start_retrain() -> tuple[bool, str]:
    """(started, what to tell the person). Refused while a retrain runs or one from this page waits.
    Raises BrokerUnreachable when Redis does not answer."""
    try:
        return _start_retrain()
    except _broker_errors() as exc:
        raise BrokerUnreachable(f"{UNAVAILABLE} ({type(exc).__name__})") from exc


def _start_retrain() -> tuple[bool, str]:
    request = request_retrain(force=True)
    return request.started, request.message


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
