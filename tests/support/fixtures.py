"""The shared pytest fixtures: real Redis, real PostgreSQL and SQLite, a migrated service environment,
the local fake safebooru, real Celery worker processes, and a database of real tag-labelled face crops.
tests/conftest.py imports them all."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlmodel import func, select

from core.settings import get_settings, reset_settings_cache
from db.engine import session_scope
from db.models import LabelSource, Post
from tests.support.env import PROJECT_ROOT, TEST_POSTGRES_URL, TEST_REDIS_URL
from tests.support.fake_safebooru import FakeSafebooru
from tests.support.rows import ready_face
from tests.support.testdata import IMAGE_SUFFIXES, crop_counts, crop_dirs


# ------------------------------------------------------------------------------------ redis ----
@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


# ------------------------------------------------------------------------------- databases ----
def _admin_engine():
    return create_engine(
        TEST_POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )


def _create_postgres_database() -> str:
    name = f"waifu_test_{uuid.uuid4().hex[:12]}"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    base, _, _ = TEST_POSTGRES_URL.rpartition("/")
    return f"{base}/{name}"


def _drop_postgres_database(url: str) -> None:
    from db.engine import engine_for

    for candidate in (url, url.replace("postgresql://", "postgresql+psycopg://", 1)):
        engine_for(candidate).dispose()
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rpartition("/")[2]}" WITH (FORCE)'))
    admin.dispose()


def _postgres_database() -> Iterator[str]:
    url = _create_postgres_database()
    try:
        yield url
    finally:
        _drop_postgres_database(url)


# what a migrated database's schema is made of: a test that changed it (a trigger, a downgrade) is caught
_SCHEMA = text(
    """
    select 'column', table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable
      from information_schema.columns where table_schema = 'public'
    union all select 'trigger', event_object_table || '.' || trigger_name
      from information_schema.triggers where trigger_schema = 'public'
    union all select 'index', tablename || '.' || indexname || ' ' || indexdef
      from pg_indexes where schemaname = 'public'
    union all select 'constraint', conrelid::regclass::text || '.' || conname || ' ' || pg_get_constraintdef(oid)
      from pg_constraint where connamespace = 'public'::regnamespace
    union all select 'routine', routine_name from information_schema.routines where routine_schema = 'public'
    union all select 'revision', version_num from alembic_version
    """
)


class MigratedPostgres:
    """One migrated PostgreSQL database per test process, emptied after each test that had it (TRUNCATE, ids
    restarted) instead of one created, migrated and dropped per test: about a quarter of a second less each.
    After a test that changed the schema or left a lock behind, it is dropped and the next test gets a new one."""

    def __init__(self) -> None:
        self.url: str | None = None
        self.schema: list[tuple[str, str]] = []

    def take(self) -> str:
        if self.url is None:
            from db.migrate import upgrade

            self.url = _create_postgres_database()  # set first: dropped at the end even if what follows fails
            upgrade(self.url)
            self.schema = self._schema()
        return self.url

    def give_back(self) -> None:
        """Empty it for the next test; drop it if it is not as migrated or cannot be emptied at once."""
        assert self.url is not None
        try:
            if self._schema() != self.schema:
                raise RuntimeError("schema changed")
            with self._engine().begin() as conn:
                conn.execute(text("SET LOCAL lock_timeout = '5s'"))  # a connection a test left in a transaction
                tables = conn.execute(
                    text("select tablename from pg_tables where schemaname = 'public'"),
                ).scalars()
                quoted = ", ".join(f'"{table}"' for table in tables if table != "alembic_version")
                conn.execute(text(f"TRUNCATE {quoted} RESTART IDENTITY CASCADE"))
        except Exception:  # whatever went wrong with it, a new database is the remedy (the test's own result stands)
            self.drop()

    def drop(self) -> None:
        if self.url is not None:
            url, self.url = self.url, None
            _drop_postgres_database(url)

    def _engine(self):
        from db.engine import engine_for

        return engine_for(self.url.replace("postgresql://", "postgresql+psycopg://", 1))

    def _schema(self) -> list[tuple[str, str]]:
        with self._engine().connect() as conn:
            return sorted(tuple(row) for row in conn.execute(_SCHEMA))


@pytest.fixture(scope="session")
def _migrated_postgres() -> Iterator[MigratedPostgres]:
    database = MigratedPostgres()
    yield database
    database.drop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each database test runs twice: on a SQLite file and on PostgreSQL. A test of the whole service
    (`service_env`) gets this process's migrated database, emptied; any other a fresh, empty database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'waifu.db'}"
    elif "service_env" in request.fixturenames:
        database: MigratedPostgres = request.getfixturevalue("_migrated_postgres")
        yield database.take()
        database.give_back()
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
        "WAIFU_API_BACKOFF_S": "0.05",
        "WAIFU_API_BACKOFF_MAX_S": "2",
        "WAIFU_DOWNLOAD_BACKOFF_S": "0.2",
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


# ------------------------------------------------------------------- labelled faces ----
def add_faces(tags: list[str] | None = None, copies: int = 1, limit: int | None = None) -> int:
    """The real 96x96 crops as ready, tag-labelled faces (resized_for_training -> train, _test -> test),
    each `copies` times (as new posts); only `tags` if given, at most `limit` files. Returns faces added."""
    settings = get_settings()
    added = 0
    with session_scope() as session:
        post_id = int(session.exec(select(func.max(Post.id))).one() or 0)
        for folder, split in zip(crop_dirs(), ("train", "test"), strict=True):
            for tag_dir in sorted(folder.iterdir()):
                if tags is not None and tag_dir.name not in tags:
                    continue
                for path in sorted(tag_dir.iterdir()):
                    if path.suffix.lower() not in IMAGE_SUFFIXES:
                        continue  # e.g. a download under way in the shared cache
                    if limit is not None and added >= limit:
                        return added
                    for _ in range(copies):
                        post_id += 1
                        relative = f"faces/{split}/{tag_dir.name}/{post_id}-{path.name}"
                        (settings.data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy(path, settings.data_dir / relative)
                        session.add(
                            Post(
                                id=post_id,
                                md5=f"{post_id:032x}",
                                file_url="https://safebooru.org//x",
                                state="done",
                                faces=1,
                            )
                        )
                        session.flush()
                        session.add(ready_face(post_id, relative, split, tag_dir.name, LabelSource.tag))
                        added += 1
    return added


def short_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short CNN training, weights=none (the default `imagenet` would try a download)."""
    for key, value in {
        "WAIFU_TRAIN_EPOCHS": "10",
        "WAIFU_TRAIN_THREADS": "2",
        "WAIFU_BACKBONE_WEIGHTS": "none",
    }.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()


@pytest.fixture
def labelled_db(service_env, monkeypatch: pytest.MonkeyPatch, redis_client) -> list[str]:
    """Every real crop as a ready, tag-labelled face in its split."""
    short_training(monkeypatch)
    train_counts, test_counts = crop_counts()
    assert add_faces() == sum(train_counts.values()) + sum(test_counts.values())
    return sorted(train_counts)
