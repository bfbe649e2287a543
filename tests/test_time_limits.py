"""Issue 17: every step bounded in time, every delivery counted when it is claimed.

Real Redis, real Celery worker processes, SQLite and PostgreSQL. The faults are injected right after a step
claimed its row (core.faults, WAIFU_TEST_FAULT): a hang in C with every signal blocked (as animeface's
k-means loop), a sleep in Python, a process that dies (as an out-of-memory kill).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from db.claims import over_time
from db.engine import session_scope
from db.models import Post, PostState
from tests.support.cli import run_cli_blocking
from tests.support.env import PROJECT_ROOT
from tests.support.waiting import wait_until
from worker.queue import enqueue

pytestmark = pytest.mark.processes


def downloaded_post() -> int:
    """A post waiting for face detection (the fault strikes right after the claim: no file is read)."""
    with session_scope() as session:
        post = Post(
            md5=uuid.uuid4().hex,
            file_url="https://safebooru.org//images/1/x.png",
            state=PostState.downloaded,
            stored_path="images/xx/none.png",
        )
        session.add(post)
        session.flush()
        return post.id


def row(post_id: int) -> Post:
    with session_scope(readonly=True) as session:
        return session.get(Post, post_id)


def failed(post_id: int) -> bool:
    return row(post_id).state == PostState.failed


def test_a_step_stuck_in_c_is_ended_at_its_hard_limit_and_fails_after_its_attempts(
    start_worker, service_env: dict[str, str]
) -> None:
    post_id = downloaded_post()
    # the fault strikes right after the claim, so a short limit is all the step needs
    fault = {"WAIFU_TEST_FAULT": "post:downloaded:hang", "WAIFU_DETECT_TIME_LIMIT_S": "5", "WAIFU_MAX_ATTEMPTS": "2"}
    start_worker(queues="cpu", concurrency=1, extra_env=fault)
    enqueue("detect", [post_id])
    # one pool process: the second attempt ran in the process the pool started after the first was ended
    wait_until(lambda: failed(post_id), 120, message="the hung detection to fail")
    post = row(post_id)
    assert post.reason == "face detection did not finish within 5 s (2 attempts)"
    assert post.claim_token is None

    status = run_cli_blocking(service_env, "status", columns=200)
    assert "time limits: 1 rows failed, 0 waiting to be tried again" in status.stdout, status.stdout


def test_a_soft_limit_is_an_attempt_not_a_broken_image(start_worker, service_env: dict[str, str]) -> None:
    """A step still in Python at its soft limit gives its row back: it is tried again, and fails only when its
    attempts are spent. (Celery's SoftTimeLimitExceeded is an ordinary exception: a step's `except Exception`
    would record it as a broken image, and raised outside one it left the row claimed with no outcome.)"""
    post_id = downloaded_post()
    fault = {"WAIFU_TEST_FAULT": "post:downloaded:sleep", "WAIFU_DETECT_TIME_LIMIT_S": "5", "WAIFU_MAX_ATTEMPTS": "2"}
    start_worker(queues="cpu", concurrency=1, extra_env=fault)
    enqueue("detect", [post_id])
    wait_until(lambda: failed(post_id), 120, message="the slow detection to fail")
    assert row(post_id).reason == "face detection did not finish within 4.5 s (2 attempts)"


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_a_step_that_kills_its_worker_fails_after_max_attempts_instead_of_looping(
    start_worker, service_env: dict[str, str], how: str
) -> None:
    post_id = downloaded_post()
    start_worker(queues="cpu", concurrency=1, extra_env={"WAIFU_TEST_FAULT": f"post:downloaded:{how}"})
    enqueue("detect", [post_id])
    wait_until(lambda: failed(post_id), 120, message="the crashing detection to fail")
    post = row(post_id)
    assert post.reason.startswith("face detection crashed its worker 3 times"), post.reason
    assert post.claims == 3  # three deliveries claimed, the fourth failed the row

    status = run_cli_blocking(service_env, "status", columns=200)
    assert "1 rows failed after their worker crashed" in status.stdout, status.stdout


def test_a_timed_out_attempt_is_given_back_until_the_last(service_env: dict[str, str]) -> None:
    """The bookkeeping alone: the first time out gives the row back with its reason, the last fails it."""
    from db.claims import claim

    post_id = downloaded_post()
    assert claim(Post, post_id, PostState.downloaded, "t1", 60) is not None
    assert over_time(Post, post_id, PostState.downloaded, "t1", 60) is True
    post = row(post_id)
    assert post.state == PostState.downloaded and post.claim_token is None and post.claims == 1
    assert post.reason == "face detection did not finish within 60 s (attempt 1 of 3); tried again"
    assert claim(Post, post_id, PostState.downloaded, "t2", 60) is not None
    assert over_time(Post, post_id, PostState.downloaded, "t2", 60) is True
    assert "(attempt 2 of 3)" in row(post_id).reason
    assert over_time(Post, post_id, PostState.downloaded, "t2", 60) is True  # not claimed: sent again, not counted
    assert row(post_id).claims == 2
    assert claim(Post, post_id, PostState.downloaded, "t3", 60) is not None
    assert over_time(Post, post_id, PostState.downloaded, "t3", 60) is False
    assert row(post_id).reason == "face detection did not finish within 60 s (3 attempts)"


# ---------------------------------------------------------------------------------- shutdown ----
def descendants(pid: int) -> set[int]:
    """Every process below `pid`, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    return state not in ("Z", "X")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_worker_shutdown_is_bounded_with_a_task_stuck_in_c(service_env: dict[str, str], tmp_path: Path) -> None:
    post_id = downloaded_post()
    env = {
        **os.environ,
        **service_env,
        "WAIFU_TEST_FAULT": "post:downloaded:hang",
        "WAIFU_DETECT_TIME_LIMIT_S": "600",  # the time limit must not be what ends it
        "WAIFU_SHUTDOWN_GRACE_S": "3",
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "waifu.cli", "worker", "--queues", "cpu", "--concurrency", "1"],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        enqueue("detect", [post_id])
        wait_until(lambda: row(post_id).claims == 1, 120, message="the detection to be claimed")
        time.sleep(1)  # the fault blocks its signals right after the claim
        tree = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)  # what `docker compose stop` sends
        try:
            proc.wait(timeout=90)  # the bound is 3 s of grace; far longer means it waits for the task
        except subprocess.TimeoutExpired:
            pytest.fail(f"waifu worker still running 90 s after SIGTERM:\n{log_path.read_text()[-3000:]}")
        wait_until(lambda: not any(alive(p) for p in tree), 30, message="every worker process to be gone")
        assert "still running 3 s after SIGTERM" in log_path.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
