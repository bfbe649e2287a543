"""Alembic, driven from code: `waifu db upgrade` and service start both call `upgrade()`."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from core.redact import mask_url, redact
from core.settings import get_settings

MIGRATIONS = Path(__file__).with_name("migrations")


class MigrationFailed(RuntimeError):
    """The database could not be brought to the schema; the message names it with its password masked."""


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # Alembic keeps options in a configparser, whose interpolation reads `%` as a reference: an encoded
    # password (`p%40ss`) would break every migration. `%%` is read back as the URL itself.
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().resolved_database_url).replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Raises MigrationFailed with one readable line (URL masked) for any failure."""
    url = url or get_settings().resolved_database_url
    try:
        command.upgrade(alembic_config(url), revision)
    except Exception as exc:
        # `from None`: the chained error may quote the URL with its password
        raise MigrationFailed(describe_failure(url, exc)) from None


def describe_failure(url: str, exc: BaseException) -> str:
    """`database <masked url>: <first line of the error, passwords masked>`."""
    first = (str(exc).strip().splitlines() or [""])[0]  # SQLAlchemy appends the SQL and a link on more lines
    return f"database {mask_url(url)}: {type(exc).__name__}: {redact(first, [url])}"


def current_revision(url: str | None = None) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from db.engine import engine_for

    with engine_for(url or get_settings().resolved_database_url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
