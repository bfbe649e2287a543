"""What waits on the broker's queues (Redis lists of kombu JSON envelopes)."""

from __future__ import annotations

import base64
import json

import redis


def queued_ids(redis_client: redis.Redis, queue: str = "io", task: str = "worker.tasks.download") -> list[int]:
    """Row ids of the `task` messages waiting in `queue`."""
    ids = []
    for raw in redis_client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        assert envelope["headers"]["task"] == task
        ids.append(args[0])
    return sorted(ids)
