"""Flower for real, against the test Redis, with basic auth, watching a real worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.support.env import PROJECT_ROOT
from tests.support.waiting import wait_until

pytestmark = pytest.mark.processes
AUTH = ("watcher", "s3cret")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def flower(service_env: dict[str, str], start_worker) -> Iterator[str]:
    start_worker(queues="io", concurrency=1)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            f"--basic-auth={AUTH[0]}:{AUTH[1]}",
        ],
        env={**os.environ, **service_env},
        cwd=PROJECT_ROOT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/metrics", timeout=2).status_code in (200, 401)
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=60, message="flower to listen")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_flower_requires_auth_lists_the_worker_and_applies_a_task(flower: str) -> None:
    assert httpx.get(f"{flower}/api/workers", timeout=10).status_code == 401
    assert httpx.get(f"{flower}/api/workers", auth=("watcher", "wrong"), timeout=10).status_code == 401

    def worker_listed() -> bool:
        answer = httpx.get(f"{flower}/api/workers", auth=AUTH, params={"refresh": "true"}, timeout=20)
        return answer.status_code == 200 and any(name.startswith("test-") for name in answer.json())

    wait_until(worker_listed, timeout=60, interval=1, message="the test worker to show in Flower")

    answer = httpx.post(f"{flower}/api/task/async-apply/worker.tasks.reconcile", auth=AUTH, json={}, timeout=20)
    assert answer.status_code == 200, answer.text
    task_id = answer.json()["task-id"]
    result: dict = {}

    def finished() -> bool:
        nonlocal result
        result = httpx.get(f"{flower}/api/task/result/{task_id}", auth=AUTH, timeout=10).json()
        return result.get("state") in ("SUCCESS", "FAILURE")

    wait_until(finished, timeout=60, interval=0.5, message="the reconcile task to run")
    assert result["state"] == "SUCCESS", result
    assert result["result"]["discovered"] == 0  # reconcile ran against the (empty) test database
    metrics = httpx.get(f"{flower}/metrics", auth=AUTH, timeout=10)
    assert metrics.status_code == 200 and "flower_events_total" in metrics.text

    # the container healthcheck of the flower service, run for real against this Flower
    check = subprocess.run(
        [sys.executable, "-m", "waifu.cli", "healthcheck", "--http", f"{flower}/metrics"],
        env={**os.environ},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    dead = subprocess.run(
        [sys.executable, "-m", "waifu.cli", "healthcheck", "--http", "http://127.0.0.1:1/"],
        env={**os.environ},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dead.returncode == 1 and "unreachable" in dead.stderr
