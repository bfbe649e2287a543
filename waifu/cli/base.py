"""What every `waifu` verb shares: the typer apps, the two consoles, the migrated database, the one-line refusal.

Heavy imports (TensorFlow, OpenCV) never happen at start-up: each command imports what it needs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console

from core.logs import setup_logging
from core.settings import get_settings

app = typer.Typer(no_args_is_help=True, help="Collect anime character faces from safebooru; keep a classifier.")
characters_app = typer.Typer(no_args_is_help=True, help="Tracked characters (safebooru tags).")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
app.add_typer(characters_app, name="characters")
app.add_typer(db_app, name="db")
faces_app = typer.Typer(no_args_is_help=True, help="Manual cleaning of detected faces.")
app.add_typer(faces_app, name="faces")
model_app = typer.Typer(no_args_is_help=True, help="Trained models.")
app.add_typer(model_app, name="model")

console = Console()
err = Console(stderr=True)


def say_error(message: object) -> None:
    """One red line on stderr, printed as is (no markup read in it, never wrapped)."""
    err.print(str(message), style="red", markup=False, highlight=False, soft_wrap=True)


@contextmanager
def exits_on(*errors: type[Exception], code: int = 1) -> Iterator[None]:
    """Turns one of `errors` (an unknown face id, an untracked character...) into its message on one line and
    exit `code`, never a traceback. A context manager, also usable as a decorator."""
    try:
        yield
    except errors as exc:
        say_error(exc)
        raise typer.Exit(code) from exc


def ensure_db() -> None:
    """Applies pending migrations, so a fresh SQLite default works without a separate step."""
    from db.migrate import MigrationFailed, upgrade

    # one line, the URL's password masked; never a traceback
    with exits_on(MigrationFailed, OSError):
        get_settings().data_dir.mkdir(parents=True, exist_ok=True)
        upgrade()


@app.callback()
def main(log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING...")] = "") -> None:
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from core.settings import settings_problem

    try:
        get_settings()  # a bad WAIFU_* value: one line naming it, before any command runs
    except (ValidationError, SettingsError) as exc:
        err.print(settings_problem(exc), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if log_level and log_level.strip().upper() not in logging.getLevelNamesMapping():
        err.print(f"bad option --log-level: {log_level[:40]!r} is not DEBUG, INFO, WARNING, ERROR or CRITICAL")
        raise typer.Exit(2)
    setup_logging(log_level.strip() or None)
