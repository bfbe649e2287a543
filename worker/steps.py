"""The pipeline, declared once: every step's public task name, queue, the table and state a row waits
in for it, the plain function that does it, and the step that follows. Celery routes, the task shells,
enqueueing and reconcile are all derived from this table.

    scrape (scraper/, not a task) -> download -> detect -> crop;  train and predict read the crops.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlmodel import SQLModel

from db.models import Face, FaceState, Post, PostState


@dataclass(frozen=True)
class Step:
    name: str  # also the kind of in-flight marker (worker.inflight)
    task: str  # public contract: Flower's async-apply, scripts
    queue: str
    table: type[SQLModel]
    waits_in: str  # the state a row sits in while it waits for this step
    function: str  # "module:function" doing the work; imported on first use (keeps Celery start-up light)
    next: str | None  # the step that takes the rows this one hands on

    def load(self) -> Callable:
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)


STEPS: dict[str, Step] = {
    s.name: s
    for s in (
        Step(
            "download",
            "worker.tasks.download",
            "io",
            Post,
            PostState.discovered,
            "download.step:download_post",
            "detect",
        ),
        Step(
            "detect", "worker.tasks.detect_faces", "cpu", Post, PostState.downloaded, "detect.step:detect_post", "crop"
        ),
        Step("crop", "worker.tasks.resize_face", "cpu", Face, FaceState.detected, "crop.step:crop_face", None),
    )
}

# tasks that are not per-row steps: (public name, queue)
JOBS = {
    "reconcile": ("worker.tasks.reconcile", "io"),
    "retrain": ("worker.tasks.retrain", "train"),
    "maybe_retrain": ("worker.tasks.maybe_retrain", "train"),
    "classify": ("worker.tasks.classify", "train"),
}

QUEUES = ("io", "cpu", "train")
TASK_ROUTES = {
    **{s.task: {"queue": s.queue} for s in STEPS.values()},
    **{name: {"queue": queue} for name, queue in JOBS.values()},
}


def enqueue(step_name: str, ids: Iterable[int]) -> int:
    """Puts rows on the step's queue; callers commit the rows first. Sets the in-flight markers first,
    so reconcile never mistakes a queued row for a lost one."""
    from worker import inflight
    from worker.app import app

    step = STEPS[step_name]
    ids = list(ids)
    if not ids:
        return 0
    inflight.mark(step.name, ids)
    for row_id in ids:
        app.send_task(step.task, args=[row_id])
    return len(ids)
