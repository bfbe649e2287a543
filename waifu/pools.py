"""Which Celery pool each kind of queue runs in, so waiting never occupies a cpu slot.

- `io` (downloads, reconcile) mostly waits: on the network and on the per-host rate limit, which sleeps.
  A `threads` pool waits cheaply, so it gets many slots (IO_THREADS) for little memory.
- `cpu` (detection, crops) computes: `prefork` processes, one per core by default.
- `train` runs TensorFlow, which must not run in forked children: `solo`, one task at a time.

`waifu run` and `waifu worker` both plan their workers here; waifu.celery_argv turns a plan into command lines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

POOL_OF_QUEUE = {"io": "threads", "cpu": "prefork", "train": "solo"}
IO_THREADS = 8


def cores() -> int:
    return os.cpu_count() or 1


def default_concurrency(pool: str) -> int | None:
    """Slots of a pool when none are asked for (None: the pool has exactly one)."""
    return {"threads": IO_THREADS, "prefork": cores()}.get(pool)


@dataclass(frozen=True)
class WorkerSpec:
    """One Celery worker process: the queues it consumes, its pool, its slots."""

    queues: tuple[str, ...]
    pool: str
    concurrency: int | None

    @property
    def kind(self) -> str:
        return "-".join(self.queues)


def plan_workers(queues: list[str] | tuple[str, ...], pool: str = "", concurrency: int = 0) -> list[WorkerSpec]:
    """One worker per pool the queues need, or a single worker with `pool` when one is forced.

    `concurrency` (0: the pool's default) sizes that single worker; when io and cpu are split it sizes the
    cpu processes, the io threads keep IO_THREADS (their number follows waiting, not cores).
    """
    if pool:
        groups = {pool: list(queues)}
    else:
        groups = {}
        for queue in queues:
            groups.setdefault(POOL_OF_QUEUE[queue], []).append(queue)
    sized = {"prefork"} if len(groups) > 1 and "prefork" in groups else set(groups)
    specs = []
    for pool_name, members in groups.items():
        slots = concurrency if concurrency and pool_name in sized else default_concurrency(pool_name)
        specs.append(WorkerSpec(tuple(members), pool_name, None if pool_name == "solo" else slots))
    return specs
