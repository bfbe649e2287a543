"""No step waits on another's work, and nothing is lost: real Celery worker processes, real Redis, the
fake site over HTTP, SQLite (and PostgreSQL where the database matters).

- two worker processes detect at the same time on SQLite (no transaction is held across detection);
- a step whose write meets "database is locked" is retried by its task and finishes;
- a worker killed with SIGKILL in the middle of a download and of a detection: both rows finish within the
  stated recovery time (claim timeout + reconcile interval), through a fresh worker and beat;
- a repost skipped in favour of an original that then fails is collected instead.
"""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlmodel import select

from core.settings import get_settings, reset_settings_cache
from db.engine import session_scope
from db.models import Post, PostState
from scraper.characters import add_characters
from tests.support.cli import run_cli
from tests.support.env import PROJECT_ROOT
from tests.support.fake_safebooru import FakePost, FakeSafebooru
from tests.support.testdata import raw_image
from tests.support.waiting import wait_for, wait_until
from worker.steps import STEPS

pytestmark = pytest.mark.processes


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def slow_to_detect(seed: int, side: int = 1800) -> bytes:
    """A smooth picture with no face: every detector and every fallback pass runs over it (seconds)."""
    y, x = np.mgrid[0:side, 0:side]
    rgb = np.stack([(x * 255 / side), (y * 255 / side), ((x + y + seed * 97) % side) * 255 / side], -1)
    return png(Image.fromarray(rgb.astype(np.uint8)))


def store_downloaded(post_id: int, data: bytes) -> int:
    """A post as the download step leaves it: file stored, row `downloaded`."""
    import hashlib

    settings = get_settings()
    md5 = hashlib.md5(data).hexdigest()
    relative = Path("images") / md5[:2] / f"{md5}.png"
    (settings.data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / relative).write_bytes(data)
    with session_scope() as session:
        session.add(
            Post(
                id=post_id,
                md5=md5,
                file_url=f"https://safebooru.org//images/1/{md5}.png",
                state=PostState.downloaded,
                stored_path=relative.as_posix(),
            )
        )
    return post_id


def listed(remote_id: int, site: str = "safebooru") -> int:
    """Our id of the post the site lists as `remote_id`."""
    with session_scope(readonly=True) as session:
        return session.exec(select(Post.id).where(Post.site == site, Post.remote_id == remote_id)).one()


def post(post_id: int) -> Post:
    with session_scope(readonly=True) as session:  # a reader never waits for SQLite's write lock
        return session.get(Post, post_id)


def start_logged(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = log.open("ab")
    return subprocess.Popen(
        argv, env={**os.environ, **env}, cwd=PROJECT_ROOT, stdout=handle, stderr=handle, start_new_session=True
    )


def celery_worker(queues: str, concurrency: int, pool: str = "prefork") -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency),
        "-P",
        pool,
        "--loglevel",
        "INFO",
        "-n",
        f"rec-{uuid.uuid4().hex[:6]}@%h",
        "--without-mingle",
        "--without-gossip",
    ]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def sqlite_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_client) -> dict[str, str]:
    """service_env pinned to SQLite: what these tests prove is about SQLite's single write lock."""
    from db.migrate import upgrade

    env = {
        "WAIFU_DATA_DIR": str(tmp_path / "data"),
        "WAIFU_DATABASE_URL": f"sqlite:///{tmp_path / 'waifu.db'}",
        "WAIFU_BROKER_URL": os.environ["WAIFU_BROKER_URL"],
        "WAIFU_DETECTOR_FALLBACKS": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    upgrade(env["WAIFU_DATABASE_URL"])
    yield env
    reset_settings_cache()


def test_two_workers_detect_at_the_same_time_on_sqlite(sqlite_env, tmp_path) -> None:
    from worker.app import app

    ids = [store_downloaded(i, slow_to_detect(i, side=1200)) for i in (1, 2, 3, 4)]
    worker = start_logged(celery_worker("cpu", 2), sqlite_env, tmp_path / "worker.log")
    try:
        results = [app.send_task(STEPS["detect"].task, args=[i]) for i in ids]
        outcomes = [r.get(timeout=300) for r in results]
    finally:
        stop(worker)
    assert [post(i).state for i in ids] == [PostState.done] * 4, (tmp_path / "worker.log").read_text()[-3000:]
    spans = sorted(tuple(o["work"]) for o in outcomes)
    # with detection inside a write transaction the second process would wait for the first to commit:
    # here some two detections ran at the same time, each between its claim and its commit
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1 :] if b[0] < a[1] - 0.2]
    assert overlapping, f"no two detections overlapped: {spans}"


def test_a_write_that_meets_database_is_locked_is_retried_and_finishes(sqlite_env, tmp_path, monkeypatch) -> None:
    env = {**sqlite_env, "WAIFU_SQLITE_BUSY_TIMEOUT_S": "0.2", "WAIFU_DETECTOR_FALLBACKS": "false"}
    store_downloaded(1, raw_image("nishikino_maki/1.png").read_bytes())
    database = sqlite_env["WAIFU_DATABASE_URL"].removeprefix("sqlite:///")
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock for a few seconds
    worker = start_logged(celery_worker("cpu", 1), env, tmp_path / "worker.log")
    try:
        from worker.app import app

        app.send_task(STEPS["detect"].task, args=[1])
        wait_until(
            lambda: "database busy, retrying" in (tmp_path / "worker.log").read_text(),
            120,
            message="the step to meet the lock",
        )
        assert post(1).state == PostState.downloaded
        holder.execute("ROLLBACK")
        wait_until(lambda: post(1).state == PostState.done, 120, message="the retried step to finish")
    finally:
        holder.close()
        stop(worker)
    log = (tmp_path / "worker.log").read_text()
    assert "database is locked" in log or "OperationalError" in log
    assert post(1).faces >= 1


def claimed(post_id: int, state: PostState) -> bool:
    row = post(post_id)
    return row.state == state and row.claim_token is not None


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
async def test_worker_killed_mid_download_and_mid_detection_recovers_within_the_stated_time(
    fake: FakeSafebooru, service_env: dict[str, str], tmp_path
) -> None:
    # the claim must outlast one detection of the slow picture even on a loaded machine, or a live worker's
    # row would be taken up again too (harmless, the compare-and-set keeps one result, but slow)
    claim_timeout_s, interval = 20.0, 1.0
    env = {
        **service_env,
        "WAIFU_DEFAULT_SITE_URL": fake.base_url,
        "WAIFU_CLAIM_TIMEOUT_S": str(claim_timeout_s),
        "WAIFU_RECONCILE_INTERVAL_S": str(interval),
        "WAIFU_STUCK_AFTER_S": "1",
        "WAIFU_BACKFILL_PAGES": "1",
        # every pass on the full picture: about 3 s on an idle core, so the detection is still under way
        # when it is looked for (on the default 250,000-pixel working copy it takes 0.4 s and can be missed)
        "WAIFU_DETECTOR_MAX_PIXELS": "0",
    }
    fake.slow_seconds = 60.0
    illustration = raw_image("nishikino_maki/1.png").read_bytes()
    slow_file = fake.add(FakePost(id=7001, tags="nishikino_maki", data=illustration, image="a.png", fault="slow_once"))
    store_downloaded(7002, slow_to_detect(7, side=1400))
    assert (await run_cli(env, "characters", "add", "nishikino_maki"))[0] == 0
    assert (await run_cli(env, "scrape", "--once"))[0] == 0
    slow = listed(slow_file.id)

    first = start_logged(celery_worker("io,cpu", 2), env, tmp_path / "first.log")
    from worker.app import app

    app.send_task(STEPS["detect"].task, args=[7002])
    try:
        await wait_for(
            lambda: claimed(slow, PostState.discovered) and claimed(7002, PostState.downloaded),
            120,
            "a download and a detection under way",
        )
    finally:
        killed_at = time.monotonic()
        stop(first, signal.SIGKILL)  # the whole worker, pool processes included, mid-download and mid-detection
    assert claimed(slow, PostState.discovered) and claimed(7002, PostState.downloaded), (
        "the kill must land while both rows are being worked on"
    )

    second = start_logged(celery_worker("io,cpu", 2), env, tmp_path / "second.log")
    beat = start_logged([sys.executable, "-m", "waifu.cli", "beat"], env, tmp_path / "beat.log")
    try:
        # stated recovery: a dead worker's claim runs out after WAIFU_CLAIM_TIMEOUT_S, the next reconcile
        # (every WAIFU_RECONCILE_INTERVAL_S) re-enqueues the row; then the step itself runs again
        await wait_for(
            lambda: post(slow).state == PostState.done and post(7002).state == PostState.done,
            240,
            "both rows to finish after the kill",
        )
        recovered_in = time.monotonic() - killed_at
    finally:
        stop(beat)
        stop(second)
    detection = 60.0  # generous: the slow picture's detection (all fallbacks) on a loaded 2-core machine
    assert recovered_in < claim_timeout_s + interval + 2 + detection, recovered_in
    assert fake.file_hits[slow_file.id] == 2, "downloaded again after the kill, and only once more"


async def test_an_original_that_fails_hands_its_repost_over(
    fake: FakeSafebooru, service_env: dict[str, str], start_worker
) -> None:
    illustration = raw_image("sakurauchi_riko/1.jpg").read_bytes()
    original = fake.add(
        FakePost(id=8001, tags="sakurauchi_riko", data=illustration, image="x.jpg", fault="redirect_offsite")
    )
    repost = fake.add(FakePost(id=8002, tags="sakurauchi_riko", data=illustration, image="y.jpg"))
    env = {**service_env, "WAIFU_DEFAULT_SITE_URL": fake.base_url}
    add_characters(["sakurauchi_riko"])
    assert (await run_cli(env, "scrape", "--once"))[0] == 0
    with session_scope() as session:
        rows = {p.remote_id: p for p in session.exec(select(Post)).all()}
    assert rows[repost.id].state == PostState.skipped and rows[repost.id].duplicate_of == rows[original.id].id

    start_worker(extra_env={"WAIFU_DEFAULT_SITE_URL": fake.base_url})
    await wait_for(lambda: post(rows[repost.id].id).state == PostState.done, 240, "the repost to be collected")
    failed, collected = post(rows[original.id].id), post(rows[repost.id].id)
    assert failed.state == PostState.failed and "redirect to disallowed host" in failed.reason
    assert collected.duplicate_of is None and collected.stored_path
    assert collected.reason is None or "original safebooru post 8001 failed" in collected.reason
    assert fake.file_hits[repost.id] == 1
