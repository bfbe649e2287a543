"""The long-running verbs: `waifu scrape`, `worker`, `beat`, `run` (all of them on this machine) and `web`."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Annotated

import typer
from rich.table import Table

from core.settings import get_settings
from waifu.cli.base import app, console, ensure_db, err, exits_on


def enqueue_downloads(post_ids: Iterable[int]) -> int:
    """What the scraper does with new posts: the download step's tasks (injected: scraper sits below worker)."""
    from worker.queue import enqueue

    return enqueue("download", post_ids)


@app.command("scrape")
def scrape_cmd(
    once: Annotated[bool, typer.Option("--once", help="One pass over every tag, then exit")] = False,
) -> None:
    """Poll safebooru for every tracked character (forever, or once)."""
    from core.errors import Unavailable
    from scraper.poller import run

    ensure_db()
    with exits_on(Unavailable, code=3):  # another scraper runs: one process keeps the site's request limit
        report = run(get_settings(), once=once, enqueue=enqueue_downloads)
    if not once or report is None:
        return
    table = Table(title="scrape --once")
    for column in ("tag", "new", "listed", "requests", "error"):
        table.add_column(column)
    for t in report.tags:
        table.add_row(t.tag, str(t.new), str(t.seen), str(t.requests), t.error or "")
    console.print(table)
    if report.tags and len(report.errors) == len(report.tags):
        raise typer.Exit(1)  # nothing could be polled at all: a configuration or network problem


def _exec_celery(argv: list[str]) -> None:
    """Replace this process with Celery, so signals (warm shutdown on SIGTERM) reach it directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


@app.command("worker")
def worker_cmd(
    queues: Annotated[str, typer.Option(help="Comma-separated queues: io, cpu, train")] = "io,cpu",
    concurrency: Annotated[
        int,
        typer.Option(
            help="Slots of the worker (default: io 8 threads, cpu one process per core); "
            "with io and cpu split, the cpu processes"
        ),
    ] = 0,
    pool: Annotated[
        str,
        typer.Option(
            help="Force one worker with this pool: prefork, solo or threads "
            "(default: io threads, cpu prefork, train solo; one worker per pool)"
        ),
    ] = "",
    hostname: Annotated[str, typer.Option(help="Worker node name (NAME-io@HOST... when split)")] = "",
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
) -> None:
    """Run Celery workers on the given queues, each kind of queue in the pool that suits it."""
    from waifu.pools import plan_workers
    from worker.app import QUEUES

    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in names if q not in QUEUES]
    if unknown or not names:
        err.print(f"[red]unknown queue(s) {unknown or queues!r}; known: {', '.join(QUEUES)}[/red]")
        raise typer.Exit(2)
    specs = plan_workers(names, pool=pool, concurrency=concurrency)
    # one Celery worker per pool, supervised here: SIGTERM stops them gracefully, and after
    # WAIFU_SHUTDOWN_GRACE_S kills what still runs (a task stuck in C would hold a warm shutdown forever)
    from waifu.celery_argv import worker_commands
    from waifu.supervisor import RestartPolicy, Supervisor, supervise

    commands = worker_commands(specs, loglevel, hostname)
    settings = get_settings()
    restart = RestartPolicy.from_settings(settings)
    from core.memory import returning_memory

    supervisor = Supervisor(env=returning_memory(os.environ), grace=settings.shutdown_grace_s)
    raise typer.Exit(supervise(supervisor, commands, restart=restart))


@app.command("beat")
def beat_cmd(loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO") -> None:
    """Run Celery beat: the reconcile (and retrain) schedule."""
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    from waifu.celery_argv import beat_argv

    _exec_celery(beat_argv(settings.data_dir / "celerybeat-schedule", loglevel))


@app.command("run")
def run_cmd(
    concurrency: Annotated[int, typer.Option(help="Processes of the cpu worker (default: one per core)")] = 0,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="Every child's log lines on the terminal instead of the summary (also WAIFU_LOG_LEVEL=DEBUG)",
        ),
    ] = False,
) -> None:
    """Run everything on this machine: scraper, workers, beat (embedded Redis if none is reachable)."""
    from waifu.runner import run_all

    raise typer.Exit(run_all(get_settings(), concurrency=concurrency, verbose=verbose))


@app.command("web")
def web_cmd(
    host: Annotated[
        str, typer.Option(help="Address to listen on (off loopback needs WAIFU_WEB_USER/PASSWORD)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (default: WAIFU_WEB_PORT)")] = 0,
) -> None:
    """Serve the web page: see, label and clean faces; watch the collection and the models."""
    from waifu.web.security import StartRefused, check_bind
    from waifu.web.server import serve

    with exits_on(StartRefused, code=2):
        check_bind(host, get_settings())  # before anything else: nothing is touched when refused
    ensure_db()
    serve(get_settings(), host, port or get_settings().web_port or 8000)
