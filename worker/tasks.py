"""Celery tasks: thin shells that load a row, call a plain function, and record the outcome.

Task names are part of the public contract (Flower's async-apply, `waifu` CLI, other tools).
"""

from __future__ import annotations

import logging

from waifu.logs import kv
from waifu.settings import get_settings
from worker import inflight
from worker.app import app

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
    inflight.clear("download", post_id)
    return str(outcome.state)


@app.task(name="worker.tasks.reconcile")
def reconcile() -> dict[str, int]:
    """Re-enqueue rows stuck in a non-terminal state whose message was lost (queue `io`, beat)."""
    from worker.reconcile import reconcile_stuck

    return reconcile_stuck(get_settings())
