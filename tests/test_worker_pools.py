"""Pools by resource: io work waits in a threads pool, cpu work computes in prefork processes, train is solo.

`waifu worker` and `waifu beat` run as real processes the way docker compose runs them; what each worker
really is and what it ran is asked from the workers themselves (`celery inspect stats`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlmodel import select

from db.engine import session_scope
from db.models import Post, PostState
from tests.support.cli import run_cli
from tests.support.env import PROJECT_ROOT
from tests.support.fake_safebooru import FakeSafebooru, load_drawn
from tests.support.waiting import wait_for
from waifu.celery_argv import node_name, worker_args
from waifu.pools import IO_THREADS, WorkerSpec, cores, plan_workers

THREADS = "celery.concurrency.thread:TaskPool"
PREFORK = "celery.concurrency.prefork:TaskPool"


# ----------------------------------------------------------------------- the plan, no process ----
def test_each_kind_of_queue_gets_its_own_pool() -> None:
    assert plan_workers(["io", "cpu"]) == [
        WorkerSpec(("io",), "threads", IO_THREADS),
        WorkerSpec(("cpu",), "prefork", cores()),
    ]
    assert plan_workers(["io", "cpu", "train"], concurrency=3) == [
        WorkerSpec(("io",), "threads", IO_THREADS),
        WorkerSpec(("cpu",), "prefork", 3),
        WorkerSpec(("train",), "solo", None),
    ]
    assert plan_workers(["io"], concurrency=16) == [WorkerSpec(("io",), "threads", 16)]
    assert plan_workers(["train"], concurrency=4) == [WorkerSpec(("train",), "solo", None)]


def test_an_explicit_pool_keeps_one_worker_as_before() -> None:
    [spec] = plan_workers(["io", "cpu"], pool="prefork", concurrency=2)
    assert spec == WorkerSpec(("io", "cpu"), "prefork", 2)
    assert worker_args(spec, "INFO", "x@y") == [
        "worker",
        "-Q",
        "io,cpu",
        "-P",
        "prefork",
        "--loglevel",
        "INFO",
        "-E",
        "-c",
        "2",
        "-n",
        "x@y",
    ]
    [train] = plan_workers(["train"], pool="prefork")
    assert "--max-tasks-per-child" in worker_args(train)  # TensorFlow never stays in a forked child
    assert node_name("", "io") == "io@%h" and node_name("box@host", "cpu") == "box-cpu@host"


# -------------------------------------------------------------------------- real processes ----
@contextlib.asynccontextmanager
async def waifu_process(env: dict[str, str], log_path: Path, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`waifu ARGS` as its own process (its own session), stopped with SIGTERM at the end if still running."""
    with log_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "waifu.cli",
            *args,
            env={**os.environ, **env},
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 60)
                except TimeoutError:
                    os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()


async def worker_stats(nodes: list[str], timeout: float = 60) -> dict[str, dict]:
    """`celery inspect stats` of the named nodes, asked until every one answers."""
    from worker.app import app

    deadline = time.monotonic() + timeout
    while True:
        stats = await asyncio.to_thread(lambda: app.control.inspect(destination=nodes, timeout=3).stats() or {})
        if set(nodes) <= set(stats):
            return stats
        assert time.monotonic() < deadline, f"workers {nodes} did not answer; got {sorted(stats)}"


def states() -> dict[str, int]:
    with session_scope() as session:
        counts: dict[str, int] = {}
        for post in session.exec(select(Post)).all():
            counts[post.state] = counts.get(post.state, 0) + 1
        return counts


@pytest.mark.processes
async def test_worker_for_io_and_cpu_runs_a_threads_and_a_prefork_worker(
    fake: FakeSafebooru, service_env: dict[str, str], tmp_path: Path
) -> None:
    posts = load_drawn(fake, {"nishikino_maki": 3, "sakurauchi_riko": 3})  # no face needed: 0 faces is done
    env = {**service_env, "WAIFU_DEFAULT_SITE_URL": fake.base_url}
    assert (await run_cli(env, "characters", "add", "nishikino_maki", "sakurauchi_riko"))[0] == 0
    assert (await run_cli(env, "scrape", "--once"))[0] == 0

    name = f"pools-{uuid.uuid4().hex[:6]}@test"
    io_node, cpu_node = node_name(name, "io"), node_name(name, "cpu")
    log_path = tmp_path / "worker.log"
    # what compose's worker services run: `waifu worker`, no pool given
    async with waifu_process(env, log_path, "worker", "--queues", "io,cpu", "--hostname", name) as proc:
        await wait_for(
            lambda: states() == {PostState.done: len(posts)}, 180, "every post downloaded (io) and detected (cpu)"
        )
        stats = await worker_stats([io_node, cpu_node])
        proc.send_signal(signal.SIGTERM)  # what `docker compose stop` sends
        await asyncio.wait_for(proc.wait(), 90)
    log = log_path.read_text(errors="replace")
    assert proc.returncode == 0, log[-3000:]

    io, cpu = stats[io_node], stats[cpu_node]
    assert io["pool"]["implementation"] == THREADS and io["pool"]["max-concurrency"] == IO_THREADS
    assert cpu["pool"]["implementation"] == PREFORK and cpu["pool"]["max-concurrency"] == cores()
    # each step ran in the pool of its resource, and only there
    assert io["total"] == {"worker.tasks.download": len(posts)}, io["total"]
    assert cpu["total"] == {"worker.tasks.detect": len(posts)}, cpu["total"]
    assert re.search(r"\.> concurrency: 8 \(thread\)", log) and re.search(r"\.> concurrency: \d+ \(prefork\)", log)
    assert "stopped child=worker-io code=0" in log and "stopped child=worker-cpu code=0" in log
    assert "Traceback" not in log
    assert all(fake.file_hits[p.id] == 1 for p in posts)


@pytest.mark.processes
async def test_beat_schedules_reconcile_and_the_io_worker_runs_it(
    fake: FakeSafebooru, service_env: dict[str, str], redis_client, tmp_path: Path
) -> None:
    posts = load_drawn(fake, {"nishikino_maki": 2, "sakurauchi_riko": 2})
    env = {
        **service_env,
        "WAIFU_DEFAULT_SITE_URL": fake.base_url,
        "WAIFU_RECONCILE_INTERVAL_S": "1",
        "WAIFU_STUCK_AFTER_S": "1",
    }
    assert (await run_cli(env, "characters", "add", "nishikino_maki", "sakurauchi_riko"))[0] == 0
    assert (await run_cli(env, "scrape", "--once"))[0] == 0
    redis_client.flushdb()  # every message (and in-flight marker) lost: only reconcile can bring them back

    node = f"beat-{uuid.uuid4().hex[:6]}@test"
    async with (
        waifu_process(env, tmp_path / "worker.log", "worker", "--queues", "io", "--hostname", node),
        waifu_process(env, tmp_path / "beat.log", "beat") as beat,
    ):
        await wait_for(
            lambda: states() == {PostState.downloaded: len(posts)},
            120,
            "the lost downloads re-enqueued by the scheduled reconcile and downloaded",
        )
        stats = await worker_stats([node])
        beat.send_signal(signal.SIGTERM)
        await asyncio.wait_for(beat.wait(), 60)
    beat_log = (tmp_path / "beat.log").read_text(errors="replace")
    assert beat.returncode == 0, beat_log[-3000:]
    assert "Sending due task reconcile (worker.tasks.reconcile)" in beat_log
    # a single kind of queue: one Celery worker (supervised by `waifu worker`), in the threads pool
    assert stats[node]["pool"]["implementation"] == THREADS
    assert stats[node]["total"].get("worker.tasks.reconcile", 0) >= 1, stats[node]["total"]
    # reconcile every second may queue a row twice around the moment a task takes it: the second message
    # finds the row past its step, so each file is still fetched once
    assert stats[node]["total"]["worker.tasks.download"] >= len(posts)
    assert all(fake.file_hits[p.id] == 1 for p in posts)
