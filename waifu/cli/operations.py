"""The verbs that look after a running service: `waifu db upgrade`, `status`, `retry-failed`, `reconcile`,
`healthcheck`."""

from __future__ import annotations

import json
import math
from typing import Annotated

import typer

from core.settings import get_settings
from waifu.cli.base import app, console, db_app, ensure_db, err, exits_on

MAX_OLDER_THAN = 10 * 365 * 86400  # ten years, in seconds


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Alembic revision")] = "head") -> None:
    """Apply Alembic migrations to WAIFU_DATABASE_URL."""
    from db.migrate import MigrationFailed, current_revision, upgrade

    with exits_on(MigrationFailed, OSError):
        get_settings().data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(revision=revision)
    console.print(f"database at revision [bold]{current_revision()}[/bold]")


@app.command("status")
def status_cmd(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """Counts per state and per character, common failures, queue lengths, cursors."""
    from waifu.status import collect_status
    from waifu.status_view import render_status

    ensure_db()
    data = collect_status(get_settings())
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    else:
        render_status(console, data)


@app.command("retry-failed")
def retry_failed_cmd() -> None:
    """Move every failed post back to the queue."""
    from worker.reconcile import retry_failed

    ensure_db()
    count = retry_failed(get_settings())
    console.print(f"re-enqueued {count} failed post(s)")


@app.command("reconcile")
def reconcile_cmd(
    older_than: Annotated[float, typer.Option(help="Seconds (default: WAIFU_STUCK_AFTER_S)")] = -1,
) -> None:
    """Re-enqueue rows stuck in a non-terminal state whose message was lost."""
    from worker.reconcile import reconcile_stuck

    if math.isnan(older_than) or older_than > MAX_OLDER_THAN:  # a date that far back does not exist
        err.print(f"bad option --older-than: {older_than} is not a number of seconds up to {MAX_OLDER_THAN}")
        raise typer.Exit(2)
    ensure_db()
    counts = reconcile_stuck(get_settings(), older_than=None if older_than < 0 else older_than)
    console.print(", ".join(f"{state}: {n} re-enqueued" for state, n in counts.items()))


@app.command("healthcheck")
def healthcheck_cmd(
    http: Annotated[str, typer.Option(help="Also require this URL to answer (any status below 500)")] = "",
    queues: Annotated[
        str, typer.Option(help="A worker's queues (io,cpu): also fail while a step on them is stalled")
    ] = "",
    restart_on_stall: Annotated[
        bool,
        typer.Option(help="On a stall, end the container's init (PID 1) so its restart policy starts it again"),
    ] = False,
) -> None:
    """Exit 0 when the database is migrated and the broker answers (container HEALTHCHECK)."""
    from alembic.script import ScriptDirectory

    from core.redact import mask_url, redact
    from db.migrate import alembic_config, current_revision
    from waifu.embedded_redis import broker_reachable

    settings = get_settings()
    problems = []
    try:
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        if current_revision() != head:
            problems.append(f"database not at migration head {head}")
    except Exception as exc:  # any failure to reach the database is the answer
        first = (str(exc).strip().splitlines() or [""])[0]
        problems.append(f"database unreachable: {redact(first, [settings.resolved_database_url])}")
    if not broker_reachable(settings.broker_url):
        problems.append(f"broker unreachable at {mask_url(settings.broker_url)}")
    if queues and not problems:  # stalls are read from the database: only once it answers
        from waifu.stalls import stall_problems

        stalls = stall_problems(settings.stall_after_s, queues)
        problems += stalls
        if stalls and restart_on_stall:
            from waifu.selfrestart import restart_for_stall

            problems.append(restart_for_stall(settings.stall_after_s))
    if http:
        import httpx

        try:
            if httpx.get(http, timeout=5).status_code >= 500:  # 401 is fine: auth is on, the server is up
                problems.append(f"{http} answers with a server error")
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            problems.append(f"{http} unreachable: {exc}")
    if problems:  # docker keeps this output (`docker inspect`): every URL in it is masked
        text = redact("; ".join(problems), [settings.resolved_database_url, settings.broker_url])
        err.print("unhealthy: " + text, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print("healthy")
