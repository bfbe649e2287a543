"""The Celery app: Redis broker, JSON only, late acks, one queue per kind of resource.

Queues: `io` (downloads, reconcile), `cpu` (face detection, resizing), `train` (retraining; solo pool).
Importing this module must stay cheap: no TensorFlow, no OpenCV.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from waifu.settings import Settings, get_settings

QUEUES = ("io", "cpu", "train")

# Stable task names: Flower's `POST /api/task/async-apply/<name>` and other tools rely on them.
TASK_ROUTES = {
    "worker.tasks.download": {"queue": "io"},
    "worker.tasks.reconcile": {"queue": "io"},
    "worker.tasks.detect_faces": {"queue": "cpu"},
    "worker.tasks.resize_face": {"queue": "cpu"},
    "worker.tasks.classify": {"queue": "train"},
    "worker.tasks.retrain": {"queue": "train"},
    "worker.tasks.maybe_retrain": {"queue": "train"},
}


def celery_config(settings: Settings) -> dict:
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.broker_url,
        "result_expires": 24 * 3600,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # the row is the truth, but the message should survive a worker crash mid-task too
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
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
                "task": "worker.tasks.reconcile",
                "schedule": settings.reconcile_interval,
                "options": {"queue": "io", "expires": settings.reconcile_interval},
            },
            "maybe-retrain": {
                "task": "worker.tasks.maybe_retrain",
                "schedule": settings.retrain_interval,
                "options": {"queue": "train", "expires": settings.retrain_interval},
            },
        },
        "timezone": "UTC",
    }


app = Celery("waifu", include=["worker.tasks"])
app.conf.update(celery_config(get_settings()))
