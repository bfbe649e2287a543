"""Every Celery command line the project starts is built here: the workers of `waifu run` and `waifu worker`
(their pools planned by waifu.pools), beat, and the benchmarks' workers.

docker-compose.yml starts its workers and beat through `waifu worker` and `waifu beat`, so through here;
its Flower service names the same CELERY_APP (tests/test_compose.py checks it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from waifu.pools import WorkerSpec

CELERY_APP = "worker.app"


def celery_argv(args: Sequence[str]) -> list[str]:
    """`celery -A worker.app ARGS` with this interpreter (the venv's Celery, whatever PATH holds)."""
    return [sys.executable, "-m", "celery", "-A", CELERY_APP, *args]


def worker_args(spec: WorkerSpec, loglevel: str = "INFO", hostname: str = "") -> list[str]:
    """The arguments after `celery -A worker.app` that start `spec`."""
    args = ["worker", "-Q", ",".join(spec.queues), "-P", spec.pool, "--loglevel", loglevel, "-E"]
    if spec.concurrency:
        args += ["-c", str(spec.concurrency)]
    if "train" in spec.queues and spec.pool == "prefork":
        args += ["--max-tasks-per-child", "1"]  # a forced prefork train worker: a fresh process per retrain
    if hostname:
        args += ["-n", hostname]
    return args


def node_name(hostname: str, kind: str) -> str:
    """The node name of one of several workers started by one command: `io@%h`, or `NAME-io@HOST`."""
    if not hostname:
        return f"{kind}@%h"
    name, at, host = hostname.partition("@")
    return f"{name}-{kind}{at}{host}"


def worker_commands(
    specs: Sequence[WorkerSpec], loglevel: str = "INFO", hostname: str = ""
) -> list[tuple[str, list[str]]]:
    """(child name, argv) of each planned worker. A single worker keeps `hostname` as given (Celery's
    default when empty); several get a node name each, so they never answer as the same node."""
    single = len(specs) == 1
    return [
        (f"worker-{s.kind}", celery_argv(worker_args(s, loglevel, hostname if single else node_name(hostname, s.kind))))
        for s in specs
    ]


def beat_argv(schedule: Path | str, loglevel: str = "INFO") -> list[str]:
    """Celery beat, keeping its schedule in the file `schedule`."""
    return celery_argv(["beat", "--loglevel", loglevel, "-s", str(schedule)])
