"""Engine and sessions built from settings; one engine per URL per process.

SQLite is the embedded default, not a toy: WAL (readers never wait for the writer), a busy timeout, write
transactions that take the lock at BEGIN (a deferred one that read first cannot upgrade once another
process committed), read-only sessions that take no lock at all. Write transactions are kept short by
the steps (db.claims); what still fails transiently is recognised by `is_transient` and retried.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import event, exc
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, create_engine

from core.settings import get_settings

READONLY = "waifu_readonly"


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        busy_ms = int(get_settings().sqlite_busy_timeout_s * 1000)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_ms / 1000})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL keeps the database consistent; fewer fsyncs
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            # Writers take the lock at the start and queue for it (busy_timeout); readers take none (WAL).
            readonly = conn.get_execution_options().get(READONLY, False)
            conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

        _ENGINES.append(engine)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # psycopg 3 is the driver we ship; plain postgresql:// would look for psycopg2
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    _ENGINES.append(engine)
    return engine


def _forget_inherited_connections() -> None:
    """A forked child (a Celery pool process started after its parent used the database, e.g. to record a
    hard time limit) must never use its parent's pooled connections: it opens its own."""
    for engine in _ENGINES:
        engine.dispose(close=False)


_ENGINES: list[Engine] = []
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_connections)


def get_engine() -> Engine:
    return engine_for(get_settings().resolved_database_url)


@contextmanager
def session_scope(readonly: bool = False) -> Iterator[Session]:
    """A session that commits on success and rolls back on error. `readonly` sessions take no SQLite
    write lock (status pages, counts): they must not write."""
    engine = get_engine()
    bind = engine.execution_options(**{READONLY: True}) if readonly else engine
    with Session(bind, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


# SQLSTATEs worth another try: serialization failure, deadlock, and the connection classes
_TRANSIENT_SQLSTATES = {"40001", "40P01", "08000", "08001", "08003", "08004", "08006", "57P01", "57P02", "57P03"}


def is_transient(error: BaseException) -> bool:
    """A database error that says "not now" rather than "never": SQLite busy/locked, a PostgreSQL
    serialization failure or deadlock, a lost or refused connection. Worth a retry with backoff."""
    if not isinstance(error, exc.DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    orig = error.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "diag", None), "sqlstate", None)
    if sqlstate in _TRANSIENT_SQLSTATES:
        return True
    text = str(orig).lower()
    if isinstance(error, exc.OperationalError):
        return any(
            word in text
            for word in (
                "database is locked",
                "database is busy",
                "locked",
                "busy",
                "could not connect",
                "connection",
                "server closed",
            )
        )
    return False
