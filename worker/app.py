"""The Celery app: Redis broker, JSON only, late acks, one queue per kind of resource.

Queues: `io` (downloads, reconcile: threads, they mostly wait), `cpu` (detection, crops: one process per
core), `train` (retraining: solo pool). Routes come from the one declaration in worker.steps.
Importing this module must stay cheap: no TensorFlow, no OpenCV.
"""

from __future__ import annotations

import logging

from celery import Celery, signals
from kombu import Queue

from core.logs import kv
from core.settings import Settings, get_settings
from worker import limits
from worker.steps import JOBS, QUEUES, TASK_ROUTES

__all__ = ["QUEUES", "app", "celery_config"]

log = logging.getLogger("waifu.worker")


def celery_config(settings: Settings) -> dict:
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.broker_url,
        "result_expires": 24 * 3600,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # the row is the truth, but the message should survive a worker crash mid-task too: a pool process
        # killed mid-task gets its message requeued at once (reject_on_worker_lost); a whole worker killed
        # gets it back after the visibility timeout, and reconcile recovers the row sooner (worker.reconcile)
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # every task bounded in time (worker.limits; enforced by the prefork pool): the hard limit ends the
        # process, the pool starts another; the row counts the attempt (db.claims) and fails after
        # WAIFU_MAX_ATTEMPTS, so neither a hang nor a crash loops
        "task_annotations": limits.task_annotations(settings),
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "worker_prefetch_multiplier": 1,
        "task_default_queue": "io",
        "task_queues": [Queue(name) for name in QUEUES],
        "task_routes": TASK_ROUTES,
        "task_track_started": True,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "beat_schedule": {
            "reconcile": {
                "task": JOBS["reconcile"].task,
                "schedule": settings.reconcile_interval_s,
                "options": {"queue": JOBS["reconcile"].queue, "expires": settings.reconcile_interval_s},
            },
            "maybe-retrain": {
                "task": JOBS["maybe_retrain"].task,
                "schedule": settings.retrain_interval_s,
                "options": {"queue": JOBS["maybe_retrain"].queue, "expires": settings.retrain_interval_s},
            },
            # a new collection's first model as soon as it has the labelled faces, not a day later; a no-op
            # (one indexed query) once any model version exists
            "first-model": {
                "task": JOBS["maybe_retrain"].task,
                "schedule": settings.reconcile_interval_s,
                "kwargs": {"first_only": True},
                "options": {"queue": JOBS["maybe_retrain"].queue, "expires": settings.reconcile_interval_s},
            },
        },
        "timezone": "UTC",
    }


app = Celery("waifu", include=["worker.tasks"])
app.conf.update(celery_config(get_settings()))


@signals.worker_process_init.connect
def _in_pool_process(**_kwargs: object) -> None:
    """Prefork pool processes turn the soft time limit into worker.limits.StepOverTime."""
    limits.IN_POOL_PROCESS = True


@signals.worker_ready.connect
def _database_ready_in_main_process(**_kwargs: object) -> None:
    """The main process writes to the database when a hard time limit ends a pool process (on_failure):
    its engine and driver are set up once here, at start, not at the first time-out hours later (a soak
    saw that one-time step as +12 MiB in the worker's memory, and a slower first record)."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from db.engine import session_scope

    try:
        with session_scope(readonly=True) as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:  # the database may be down at start: on_failure connects when it needs to
        log.warning(kv("database not reachable at worker start", error=str(exc).splitlines()[0][:200]))


@signals.worker_ready.connect
def _steps_loaded_at_start(sender: object = None, **_kwargs: object) -> None:
    """The steps of the queues this worker consumes are imported at start, with the decoders they load on
    first use: a worker's memory settles before work (a soak saw the io worker grow by late imports)."""
    from core.images import load_decoders
    from worker.steps import STEPS

    consumed = getattr(getattr(getattr(sender, "app", app), "amqp", None), "queues", None)
    queues = set(getattr(consumed, "consume_from", None) or QUEUES)
    for step in STEPS.values():
        if step.queue in queues:
            step.load()
    load_decoders()


@signals.task_postrun.connect
def _tidy_memory(**_kwargs: object) -> None:
    """Freed memory goes back to the system after tasks (core.memory.tidy: at most once a minute)."""
    from core.memory import tidy

    tidy()


@signals.setup_logging.connect
def _one_log_format(loglevel: str | None = None, **_kwargs: object) -> None:
    """Workers and beat log like every other process (our transitions included), one line per event."""
    from core.logs import setup_logging

    setup_logging(loglevel if isinstance(loglevel, str) else None)
