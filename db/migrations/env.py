"""Alembic environment: runs migrations on the engine the service itself would use."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import db.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from db.engine import engine_for

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    engine = engine_for(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        raw = connection.connection.driver_connection
        if sqlite:
            assert raw is not None  # a live connection's DBAPI connection (sqlite3's)
            # SQLite ALTERs rebuild a table (batch mode): with foreign keys on, dropping the old `post` would
            # cascade into every face. Off outside any transaction (SQLite ignores it inside one), checked after.
            raw.execute("PRAGMA foreign_keys=OFF")
        try:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=sqlite,  # SQLite needs batch ALTERs
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
            connection.commit()
            if sqlite and raw is not None:
                broken = raw.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"foreign keys broken by the migration: {broken[:5]}")
        finally:
            if sqlite and raw is not None:
                raw.execute("PRAGMA foreign_keys=ON")


run_migrations_online()
