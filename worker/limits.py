"""Time limits of every task, from the settings (WAIFU_<KIND>_TIME_LIMIT_S).

The hard limit ends the pool process running the task, whatever it is doing (C code that never returns
included); the pool starts a new one. The soft limit, a little earlier, raises `StepOverTime` in the task
so it can give its row back in order. Celery enforces both only in the prefork pool (the cpu queue and a
forced prefork worker); threads and solo pools ignore them, so the io steps keep their own deadlines
(downloads: WAIFU_HTTP_TIMEOUT_S plus size over WAIFU_DOWNLOAD_MIN_RATE).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from core.settings import Settings
from worker.steps import JOBS, STEPS

# the setting that bounds each task
LIMIT_SETTING = {
    **{name: f"{step}_time_limit_s" for step in ("download", "detect", "crop") for name in STEPS[step].task_names},
    JOBS["reconcile"].task: "reconcile_time_limit_s",
    JOBS["retrain"].task: "retrain_time_limit_s",
    JOBS["maybe_retrain"].task: "retrain_time_limit_s",
    JOBS["classify"].task: "retrain_time_limit_s",
}


def soft_of(hard: float) -> float:
    """A little under the hard limit: 10 % earlier, at most 10 s earlier."""
    return max(hard - 10.0, hard * 0.9)


def hard_limit(settings: Settings, task_name: str) -> float:
    return float(getattr(settings, LIMIT_SETTING[task_name]))


def task_annotations(settings: Settings) -> dict[str, dict[str, float]]:
    """Celery's task_annotations: both limits of every task."""
    return {
        name: {"time_limit": hard_limit(settings, name), "soft_time_limit": soft_of(hard_limit(settings, name))}
        for name in LIMIT_SETTING
    }


class StepOverTime(BaseException):
    """The soft time limit, raised in the task. A BaseException: a step's `except Exception` (which records a
    bad input on its row) must not mistake running out of time for a property of the input."""


# set in prefork pool processes only (worker_process_init): the solo and threads pools' main thread keeps
# Celery's own SIGUSR1 handler (a stack dump)
IN_POOL_PROCESS = False


def _raise_over_time(_signum: int, _frame: object) -> None:
    raise StepOverTime()


@contextmanager
def soft_limit_raises_over_time() -> Iterator[None]:
    """In a prefork pool process (the main thread), turn billiard's soft-limit signal into StepOverTime
    for the duration of one step; elsewhere (threads pool) no soft limit arrives and nothing changes."""
    usr1 = getattr(signal, "SIGUSR1", None)
    if usr1 is None or not IN_POOL_PROCESS or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(usr1, _raise_over_time)
    try:
        yield
    finally:
        signal.signal(usr1, previous)
