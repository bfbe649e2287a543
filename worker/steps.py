"""The pipeline, declared once: every step's public task name, queue, the table and state a row waits
in for it, the plain function that does it, and the step that follows; and the jobs that are not per-row
steps. Celery routes, the task shells, enqueueing (worker.queue) and reconcile are all derived from it.

    scrape (scraper/, not a task) -> download -> detect -> crop;  train and predict read the crops.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from db.models import Face, FaceState, Post, PostState


@dataclass(frozen=True)
class Step:
    name: str  # also the kind of in-flight marker (worker.inflight)
    task: str  # public contract: Flower's async-apply, scripts
    queue: str
    table: type[Post] | type[Face]
    waits_in: str  # the state a row sits in while it waits for this step
    function: str  # "module:function" doing the work; imported on first use (keeps Celery start-up light)
    next: str | None  # the step that takes the rows this one hands on
    # earlier public names of the task, still registered and routed: scripts and Flower calls written for them work
    aliases: tuple[str, ...] = ()

    @property
    def task_names(self) -> tuple[str, ...]:
        return (self.task, *self.aliases)

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
            "detect",
            "worker.tasks.detect",
            "cpu",
            Post,
            PostState.downloaded,
            "detect.step:detect_post",
            "crop",
            aliases=("worker.tasks.detect_faces",),
        ),
        Step(
            "crop",
            "worker.tasks.crop",
            "cpu",
            Face,
            FaceState.detected,
            "crop.step:crop_face",
            None,
            aliases=("worker.tasks.resize_face",),
        ),
    )
}


@dataclass(frozen=True)
class Job:
    """A task that is not a per-row step."""

    task: str  # public contract, like Step.task
    queue: str


JOBS: dict[str, Job] = {
    "reconcile": Job("worker.tasks.reconcile", "io"),
    "retrain": Job("worker.tasks.retrain", "train"),
    "maybe_retrain": Job("worker.tasks.maybe_retrain", "train"),
    "classify": Job("worker.tasks.classify", "train"),
}

QUEUES = ("io", "cpu", "train")
TASK_ROUTES = {
    **{name: {"queue": s.queue} for s in STEPS.values() for name in s.task_names},
    **{job.task: {"queue": job.queue} for job in JOBS.values()},
}
