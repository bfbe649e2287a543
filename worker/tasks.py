"""Celery tasks: thin shells that load a row, call a plain function, and record the outcome.

Task names are part of the public contract (Flower's async-apply, `waifu` CLI, other tools).
"""

from __future__ import annotations

import logging

from db.models import PostState
from waifu.logs import kv
from waifu.settings import get_settings
from worker import inflight
from worker.app import app
from worker.enqueue import enqueue_detections, enqueue_resizes

log = logging.getLogger("waifu.tasks")


@app.task(name="worker.tasks.download", bind=True, max_retries=None)
def download(self, post_id: int) -> str:
    """Fetch, verify and store one post's file (queue `io`)."""
    from worker.download import download_post

    try:
        outcome = download_post(post_id, get_settings())
    except Exception:
        # the row stays non-terminal; reconcile picks it up once the marker is gone
        inflight.clear("download", post_id)
        raise
    if outcome.retry_in is not None:
        log.info(kv("retry", task="download", post=post_id, countdown=round(outcome.retry_in, 2)))
        raise self.retry(countdown=outcome.retry_in)
    if outcome.state == PostState.downloaded:
        enqueue_detections([post_id])  # the row is committed: the next step may start
    inflight.clear("download", post_id)
    return str(outcome.state)


@app.task(name="worker.tasks.detect_faces")
def detect_faces(post_id: int) -> dict:
    """Find every face of a downloaded post (queue `cpu`)."""
    from worker.faces import detect_post

    try:
        outcome = detect_post(post_id, get_settings())
        enqueue_resizes(outcome.face_ids)
    finally:
        inflight.clear("detect", post_id)
    return {"state": outcome.state, "faces": len(outcome.face_ids)}


@app.task(name="worker.tasks.resize_face")
def resize_face(face_id: int) -> str | None:
    """Write one face's square crop, label and split it (queue `cpu`)."""
    from worker.faces import resize_face as resize

    try:
        return resize(face_id, get_settings())
    finally:
        inflight.clear("resize", face_id)


@app.task(name="worker.tasks.reconcile")
def reconcile() -> dict[str, int]:
    """Re-enqueue rows stuck in a non-terminal state whose message was lost (queue `io`, beat)."""
    from worker.reconcile import reconcile_stuck

    return reconcile_stuck(get_settings())


def _retrain_outcome(force: bool, progress=None) -> dict:  # noqa: ANN001
    from worker.retrain import NotEnoughData, RetrainBusy, run_retrain, should_retrain

    settings = get_settings()
    if not force:
        go, why = should_retrain(settings)
        if not go:
            return {"status": "skipped", "reason": why}
    try:
        summary = run_retrain(settings, progress=progress)
    except RetrainBusy as exc:
        return {"status": "busy", "reason": str(exc)}
    except NotEnoughData as exc:
        return {"status": "skipped", "reason": str(exc)}
    if summary["status"] == "current":
        app.send_task("worker.tasks.classify")  # a new model: refresh the suggestions on ambiguous faces
    return summary


@app.task(name="worker.tasks.classify")
def classify(face_ids: list[int] | None = None) -> int:
    """The current model's suggestion for ambiguous faces (queue `train`: TensorFlow stays in one process)."""
    from worker.retrain import suggest_for_ambiguous

    return suggest_for_ambiguous(get_settings(), face_ids)


@app.task(name="worker.tasks.retrain", bind=True)
def retrain(self, force: bool = True) -> dict:
    """Train, evaluate against the current model, promote if better (queue `train`, solo pool).

    Flower: `POST /api/task/async-apply/worker.tasks.retrain`. One at a time: a second answers `busy`.
    """

    def progress(info: dict) -> None:
        self.update_state(state="PROGRESS", meta={k: v for k, v in info.items() if isinstance(v, int | float | str)})

    return _retrain_outcome(force, progress)


@app.task(name="worker.tasks.maybe_retrain")
def maybe_retrain() -> dict:
    """The beat trigger: retrains only when enough new labelled faces arrived (queue `train`)."""
    return _retrain_outcome(force=False)
