"""The one place that puts work on the broker. Callers commit the rows first, then enqueue."""

from __future__ import annotations

from collections.abc import Iterable

from worker import inflight
from worker.app import app


def enqueue(task_name: str, kind: str, ids: Iterable[int]) -> int:
    ids = list(ids)
    if not ids:
        return 0
    inflight.mark(kind, ids)
    for item_id in ids:
        app.send_task(task_name, args=[item_id])
    return len(ids)


def enqueue_downloads(post_ids: Iterable[int]) -> int:
    return enqueue("worker.tasks.download", "download", post_ids)


def enqueue_detections(post_ids: Iterable[int]) -> int:
    return enqueue("worker.tasks.detect_faces", "detect", post_ids)


def enqueue_resizes(face_ids: Iterable[int]) -> int:
    return enqueue("worker.tasks.resize_face", "resize", face_ids)
