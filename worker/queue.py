"""Sending rows to a step: the one way work is enqueued (the scraper, the task shells, reconcile, retries).

Kept apart from the declaration (worker.steps), which the Celery app itself reads: sending needs the app.
"""

from __future__ import annotations

from collections.abc import Iterable

from worker import inflight
from worker.app import app
from worker.steps import STEPS


def enqueue(step_name: str, ids: Iterable[int]) -> int:
    """Puts rows on the step's queue; callers commit the rows first. Sets the in-flight markers first,
    so reconcile never mistakes a queued row for a lost one."""
    step = STEPS[step_name]
    ids = list(ids)
    if not ids:
        return 0
    inflight.mark(step.name, ids)
    for row_id in ids:
        app.send_task(step.task, args=[row_id])
    return len(ids)
