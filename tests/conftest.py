"""Shared fixtures: real Redis, real PostgreSQL and SQLite, a real Celery worker, a local fake safebooru.

The broker for tests is a dedicated Redis database (default 127.0.0.1:6379/14, override with
WAIFU_TEST_REDIS_URL); PostgreSQL tests create a throw-away database next to `test`
(override the server with WAIFU_TEST_POSTGRES_URL).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TEST_REDIS_URL = os.environ.get("WAIFU_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
TEST_POSTGRES_URL = os.environ.get("WAIFU_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

# Must happen before any project module reads its settings (the Celery app reads them at import).
os.environ["WAIFU_BROKER_URL"] = TEST_REDIS_URL
os.environ.setdefault("WAIFU_LOG_LEVEL", "INFO")
os.environ["WAIFU_EMBEDDED_REDIS"] = "false"
# tests train from scratch (weights=none) on small real data: no ImageNet download, same result everywhere
os.environ["WAIFU_BACKBONE_WEIGHTS"] = "none"

import redis  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from core.settings import reset_settings_cache  # noqa: E402
from tests.fake_safebooru import FakeSafebooru  # noqa: E402
from tests.testdata import ImagesUnavailable  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------- real images ----
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A test without its real images fails with the one line that says how to provide them, no traceback."""
    outcome = yield
    if call.excinfo is not None and call.excinfo.errisinstance(ImagesUnavailable):
        outcome.get_result().longrepr = str(call.excinfo.value)


# ------------------------------------------------------------------------------------ redis ----
@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


# ------------------------------------------------------------------------------- databases ----
def _postgres_database() -> Iterator[str]:
    name = f"waifu_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(
        TEST_POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base, _, _ = TEST_POSTGRES_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        from db.engine import engine_for

        url = f"{base}/{name}"
        for candidate in (url, url.replace("postgresql://", "postgresql+psycopg://", 1)):
            engine_for(candidate).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each database test runs twice: on a SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'waifu.db'}"
    else:
        yield from _postgres_database()


@pytest.fixture
def service_env(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_client: redis.Redis
) -> Iterator[dict[str, str]]:
    """Environment of a whole service: data dir, migrated database, clean broker. Returns the env vars."""
    data_dir = tmp_path / "data"
    env = {
        "WAIFU_DATA_DIR": str(data_dir),
        "WAIFU_DATABASE_URL": db_url,
        "WAIFU_BROKER_URL": TEST_REDIS_URL,
        "WAIFU_REQUESTS_PER_SECOND": "20",
        "WAIFU_DOWNLOADS_PER_SECOND": "50",
        "WAIFU_API_BACKOFF": "0.05",
        "WAIFU_API_BACKOFF_MAX": "2",
        "WAIFU_DOWNLOAD_BACKOFF": "0.2",
        "WAIFU_BACKBONE_WEIGHTS": "none",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WAIFU_LBPCASCADE_PATH", raising=False)  # the cascade shipped in detect/ is used
    reset_settings_cache()
    from db.migrate import upgrade

    upgrade(db_url)
    yield env
    reset_settings_cache()


# ----------------------------------------------------------------------------- fake site ----
@pytest.fixture
async def fake() -> FakeSafebooru:
    site = FakeSafebooru()
    await site.start()
    yield site
    await site.stop()


# -------------------------------------------------------------------------- celery worker ----
@pytest.fixture
def start_worker(service_env: dict[str, str]) -> Iterator[Callable[..., subprocess.Popen]]:
    """Starts real `celery worker` processes (subprocesses) with the test environment."""
    procs: list[subprocess.Popen] = []

    def start(
        queues: str = "io,cpu", concurrency: int = 2, extra_env: dict[str, str] | None = None, pool: str = "prefork"
    ) -> subprocess.Popen:
        env = {**os.environ, **service_env, **(extra_env or {})}
        cmd = [
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
            f"test-{uuid.uuid4().hex[:6]}@%h",
            "--without-mingle",
            "--without-gossip",
        ]
        proc = subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_until(
    predicate: Callable[[], bool], timeout: float = 120.0, interval: float = 0.25, message: str = "condition"
) -> None:
    """Polls `predicate` until true; fails the test with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {message}")


def ready_face(post_id: int, path: str, split: str, label: str | None, source: str):
    """A ready face whose 96x96 crop is the whole file at `path` (relative to the data dir): what the crop
    step leaves behind, for tests that start from faces rather than from illustrations."""
    from db.models import Face, FaceState

    return Face(
        post_id=post_id,
        detector="animeface",
        x=0,
        y=0,
        w=96,
        h=96,
        crop_left=0,
        crop_top=0,
        crop_right=96,
        crop_bottom=96,
        state=FaceState.ready,
        path=path,
        split=split,
        label=label,
        label_source=source,
    )
