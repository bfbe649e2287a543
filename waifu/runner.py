"""`waifu run`: the whole service on one machine, no Docker.

Starts (as child processes) an io worker (threads pool: downloads wait on the network and the rate limit
cheaply), a cpu worker (prefork, one process per core), a train worker (solo), beat and the scraper; uses
the Redis at WAIFU_BROKER_URL or, when none answers, an embedded redis-server (waifu.embedded_redis).
The children's output goes to one log file under the data dir, each line prefixed with the child's name;
the terminal shows a live summary (waifu.live), or with --verbose the children's lines as they come.
Ctrl-C (or SIGTERM) stops every child gracefully (waifu.supervisor), then the embedded Redis.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from core.logs import kv
from core.memory import returning_memory
from core.redact import mask_url
from core.settings import Settings
from waifu.celery_argv import beat_argv, worker_commands
from waifu.embedded_redis import broker_reachable, start_embedded_redis
from waifu.pools import plan_workers
from waifu.supervisor import GRACE_S, ChildLog, ChildLogHandler, RestartPolicy, Supervisor, supervise

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger("waifu.run")

RUN_LOG = Path("logs") / "waifu-run.log"  # under the data dir


def child_commands(settings: Settings, concurrency: int = 0) -> list[tuple[str, list[str]]]:
    """io worker (threads), cpu worker (prefork, `concurrency` processes, default one per core), train
    worker (solo), beat, scraper, and the web page on 127.0.0.1:WAIFU_WEB_PORT (unless it is 0)."""
    from worker.app import QUEUES

    schedule = str((settings.data_dir / "celerybeat-schedule").resolve())
    return [
        *worker_commands(plan_workers(QUEUES, concurrency=concurrency)),
        ("beat", beat_argv(schedule)),
        ("scraper", [sys.executable, "-m", "waifu.cli", "scrape"]),
    ] + (
        [("web", [sys.executable, "-m", "waifu.cli", "web", "--host", "127.0.0.1", "--port", str(settings.web_port)])]
        if settings.web_port
        else []
    )


@contextmanager
def logs_into(output: ChildLog, verbose: bool) -> Iterator[None]:
    """Our own log lines go to the run log too; unless verbose, the terminal shows only problems (and the
    summary)."""
    root = logging.getLogger()
    own = ChildLogHandler(output)
    root.addHandler(own)
    terminal = [h for h in root.handlers if getattr(h, "_waifu", False)]
    if not verbose:
        for handler in terminal:
            handler.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(own)
        for handler in terminal:
            handler.setLevel(logging.NOTSET)


def run_all(settings: Settings, concurrency: int = 0, verbose: bool = False) -> int:
    from rich.console import Console

    console = Console()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    verbose = verbose or settings.log_level.upper() == "DEBUG"
    output = ChildLog((settings.data_dir / RUN_LOG).resolve(), echo=sys.stderr if verbose else None)
    console.print(f"waifu run: full logs in {output.path}", soft_wrap=True)
    try:
        with logs_into(output, verbose):
            log.info(kv("waifu run starting", logs=output.path, verbose=verbose))
            return _run(settings, concurrency, verbose, output, console)
    finally:
        output.close()


def _run(settings: Settings, concurrency: int, verbose: bool, output: ChildLog, console: Console) -> int:
    from db.migrate import MigrationFailed, upgrade
    from waifu.live import RunView

    try:
        upgrade()
    except MigrationFailed as exc:  # its message masks the URL's password
        log.error(kv("database migration failed", reason=str(exc)))
        console.print(f"waifu run: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 2
    # children's lines reach the log as they happen; their big freed blocks go back to the system
    env = returning_memory({**os.environ, "PYTHONUNBUFFERED": "1"})
    redis_proc = None
    broker = settings.broker_url
    if not broker_reachable(settings.broker_url):
        if not settings.embedded_redis:
            hint = "start Redis or set WAIFU_EMBEDDED_REDIS"
            log.error(kv("broker unreachable", url=mask_url(settings.broker_url), hint=hint))
            return 2
        redis_proc, broker = start_embedded_redis(settings.data_dir, settings.broker_url)
        env["WAIFU_BROKER_URL"] = broker
        log.info(kv("embedded redis", url=mask_url(broker), reason=f"{mask_url(settings.broker_url)} unreachable"))

    supervisor = Supervisor(env=env, output=output, grace=settings.shutdown_grace_s)
    commands = child_commands(settings, concurrency)
    try:
        restart = RestartPolicy.from_settings(settings)
        if verbose:
            code = supervise(supervisor, commands, restart=restart)
        else:
            view = RunView(
                settings.model_copy(update={"broker_url": broker}),
                console,
                output.path,
                supervisor.children,
                embedded_redis=redis_proc is not None,
            )
            with view:
                code = supervise(supervisor, commands, tick=view.tick, restart=restart)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=GRACE_S)
    if supervisor.died is not None:
        name = supervisor.died.name
        console.print(f"[red]{name} exited by itself and used up its restarts; everything was stopped. "
                      "Its last lines:[/red]")  # fmt: skip
        for line in output.tail(name):
            console.print(f"  {line}", markup=False, highlight=False)
    states = ", ".join(f"{c.name} {c.proc.returncode}" for c in supervisor.children if c.proc)
    console.print(f"waifu run stopped ({states}); full logs in {output.path}", soft_wrap=True)
    return code
