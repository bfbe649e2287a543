"""The `waifu` command line. Commands are thin: they parse, call a plain function, and print.

Heavy imports (TensorFlow, OpenCV) never happen at start-up: each command imports what it needs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

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


def _ensure_db() -> None:
    """Applies pending migrations, so a fresh SQLite default works without a separate step."""
    from db.migrate import MigrationFailed, upgrade

    try:
        get_settings().data_dir.mkdir(parents=True, exist_ok=True)
        upgrade()
    except (MigrationFailed, OSError) as exc:  # one line, the URL's password masked; never a traceback
        err.print(str(exc), style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


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


# ------------------------------------------------------------------------------- database ----
@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Alembic revision")] = "head") -> None:
    """Apply Alembic migrations to WAIFU_DATABASE_URL."""
    from db.migrate import MigrationFailed, current_revision, upgrade

    try:
        get_settings().data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(revision=revision)
    except (MigrationFailed, OSError) as exc:
        err.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"database at revision [bold]{current_revision()}[/bold]")


# ----------------------------------------------------------------------------- characters ----
SITE_OPTION = typer.Option(help="Gelbooru-0.2 site the tags belong to (see core/sites.py)")


@characters_app.command("add")
def characters_add(
    tags: Annotated[list[str], typer.Argument(help="character tags of the site, e.g. nishikino_maki")],
    extra: Annotated[str, typer.Option(help="Extra search terms, e.g. '-animated -comic'")] = "",
    ratings: Annotated[
        str, typer.Option(help="Ratings to keep, comma separated, in the site's words (default: all)")
    ] = "",
    site: Annotated[str, SITE_OPTION] = "safebooru",
) -> None:
    """Track characters; the next poll starts collecting them."""
    from scraper.characters import add_characters

    _ensure_db()
    try:
        added, updated = add_characters(tags, extra_terms=extra, ratings=ratings, site=site)
    except ValueError as exc:  # an unknown site, a rating word the site does not use, a tag that is a query
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    for tag in added:
        console.print(f"[green]added[/green] {tag} ({site})")
    for tag in updated:
        console.print(f"[yellow]updated[/yellow] {tag} ({site})")


@characters_app.command("list")
def characters_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """List tracked characters with their post counts."""
    from scraper.characters import list_characters

    _ensure_db()
    rows = list_characters()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="tracked characters")
    for column in ("site", "tag", "extra terms", "ratings", "posts", "newest id", "last poll"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["site"],
            r["tag"],
            r["extra_terms"],
            r["ratings"] or "all",
            str(r["posts"]),
            str(r["newest_id"] or "-"),
            r["last_poll_at"] or "never",
        )
    console.print(table)


@characters_app.command("remove")
def characters_remove(
    tags: Annotated[list[str], typer.Argument(help="tags to stop tracking")],
    site: Annotated[str, SITE_OPTION] = "safebooru",
) -> None:
    """Stop tracking characters (their posts and files stay)."""
    from scraper.characters import normalize_tag, remove_characters

    _ensure_db()
    removed = remove_characters(tags, site=site)
    for tag in tags:
        console.print(f"[red]removed[/red] {tag}" if normalize_tag(tag) in removed else f"not tracked: {tag}")
    if not removed:
        raise typer.Exit(1)


# -------------------------------------------------------------------------------- scraper ----
def enqueue_downloads(post_ids: Iterable[int]) -> int:
    """What the scraper does with new posts: the download step's tasks (injected: scraper sits below worker)."""
    from worker.queue import enqueue

    return enqueue("download", post_ids)


@app.command()
def scrape(once: Annotated[bool, typer.Option("--once", help="One pass over every tag, then exit")] = False) -> None:
    """Poll safebooru for every tracked character (forever, or once)."""
    from core.errors import Unavailable
    from scraper.poller import run

    _ensure_db()
    try:
        report = run(get_settings(), once=once, enqueue=enqueue_downloads)
    except Unavailable as exc:  # another scraper runs: one process keeps the site's request limit
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(3) from exc
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


# -------------------------------------------------------------------------- celery shells ----
def _exec_celery(argv: list[str]) -> None:
    """Replace this process with Celery, so signals (warm shutdown on SIGTERM) reach it directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


@app.command()
def worker(
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


@app.command()
def beat(loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO") -> None:
    """Run Celery beat: the reconcile (and retrain) schedule."""
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    from waifu.celery_argv import beat_argv

    _exec_celery(beat_argv(settings.data_dir / "celerybeat-schedule", loglevel))


@app.command()
def run(
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


# ----------------------------------------------------------------------------- operations ----
@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False) -> None:
    """Counts per state and per character, common failures, queue lengths, cursors."""
    from waifu.status import collect_status
    from waifu.status_view import render_status

    _ensure_db()
    data = collect_status(get_settings())
    if as_json:
        print(json.dumps(data, indent=2, default=str))
    else:
        render_status(console, data)


@app.command("retry-failed")
def retry_failed_cmd() -> None:
    """Move every failed post back to the queue."""
    from worker.reconcile import retry_failed

    _ensure_db()
    count = retry_failed(get_settings())
    console.print(f"re-enqueued {count} failed post(s)")


MAX_OLDER_THAN = 10 * 365 * 86400  # ten years, in seconds


@app.command()
def reconcile(
    older_than: Annotated[float, typer.Option(help="Seconds (default: WAIFU_STUCK_AFTER)")] = -1,
) -> None:
    """Re-enqueue rows stuck in a non-terminal state whose message was lost."""
    from worker.reconcile import reconcile_stuck

    if math.isnan(older_than) or older_than > MAX_OLDER_THAN:  # a date that far back does not exist
        err.print(f"bad option --older-than: {older_than} is not a number of seconds up to {MAX_OLDER_THAN}")
        raise typer.Exit(2)
    _ensure_db()
    counts = reconcile_stuck(get_settings(), older_than=None if older_than < 0 else older_than)
    console.print(", ".join(f"{state}: {n} re-enqueued" for state, n in counts.items()))


@app.command()
def healthcheck(
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


@app.command("retrain")
def retrain_cmd(
    force: Annotated[bool, typer.Option("--force", help="Retrain even if few new faces arrived")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress and print the metrics")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits at most")] = 6 * 3600,
) -> None:
    """Enqueue a retrain on the `train` queue (one at a time)."""
    from worker.app import app as celery_app
    from worker.retrain_request import request_retrain

    request = request_retrain(force)
    if not request.started:  # queued from the web page or another terminal: the same single retrain
        console.print(f"{request.message} (task {request.task_id}); not starting another")
        raise typer.Exit(1)
    console.print(f"retrain enqueued: task {request.task_id}")
    if not wait:
        return
    result = celery_app.AsyncResult(request.task_id)
    from waifu.retrain_view import follow

    summary = follow(result, console, timeout)
    if summary.get("status") in ("busy", "skipped", "failed"):
        raise typer.Exit(1)


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="illustrations or face crops")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image")] = False,
    annotate: Annotated[Path | None, typer.Option(help="Write each image with boxes and names here")] = None,
) -> None:
    """Detect faces and name each with the current model (top 3 with probabilities)."""
    from waifu.predict_view import predict_paths

    _ensure_db()
    if not predict_paths(paths, as_json=as_json, annotate_dir=annotate, console=console):
        raise typer.Exit(1)


@app.command()
def report(out: Annotated[Path, typer.Option(help="Directory for the PNGs and index.html")] = Path("report")) -> None:
    """Write PNGs (training curves, confusion matrix, test predictions, growth) and one HTML page."""
    from train.report import write_report

    _ensure_db()
    page = write_report(get_settings(), out)
    console.print(f"report written: {page}")


# ---------------------------------------------------------------------------------- faces ----
# a database id: BIGINT, so a larger number is a usage error rather than an overflow in the driver
FACE_ID = typer.Argument(min=1, max=2**63 - 1, help="face id (waifu status, the web page)")


@faces_app.command("label")
def faces_label(face_id: Annotated[int, FACE_ID], tag: str) -> None:
    """Give a face a character by hand (overrides the automatic label)."""
    from labels.manual import set_manual_label

    _ensure_db()
    try:
        face = set_manual_label(face_id, tag)
    except LookupError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"face {face.id}: label [bold]{face.label}[/bold] (manual), split {face.split}")


@faces_app.command("reject")
def faces_reject(face_id: Annotated[int, FACE_ID]) -> None:
    """Mark a detection as not a usable face (never trained on)."""
    from labels.manual import set_manual_label

    _ensure_db()
    try:
        face = set_manual_label(face_id, None)
    except LookupError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"face {face.id}: rejected")


@faces_app.command("undo")
def faces_undo(
    face_id: Annotated[int | None, typer.Argument(min=1, max=2**63 - 1, help="only this face's latest change")] = None,
) -> None:
    """Undo the latest label/reject/accept (all faces of a bulk action), or FACE_ID's latest change."""
    from labels.manual import undo

    _ensure_db()
    try:
        result = undo(face_id)
    except LookupError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    for face in result.faces:
        console.print(f"face {face.id}: {face.state}, label {face.label or '-'} ({face.label_source or '-'})")
    for note in result.kept:
        console.print(f"[yellow]kept[/yellow] {note}")


@app.command()
def web(
    host: Annotated[
        str, typer.Option(help="Address to listen on (off loopback needs WAIFU_WEB_USER/PASSWORD)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (default: WAIFU_WEB_PORT)")] = 0,
) -> None:
    """Serve the web page: see, label and clean faces; watch the collection and the models."""
    from waifu.web.security import StartRefused, check_bind
    from waifu.web.server import serve

    try:
        check_bind(host, get_settings())  # before anything else: nothing is touched when refused
    except StartRefused as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    _ensure_db()
    serve(get_settings(), host, port or get_settings().web_port or 8000)


@app.command()
def detect(
    paths: Annotated[list[Path], typer.Argument(help="image files")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image")] = False,
    annotate: Annotated[Path | None, typer.Option(help="Write each image with boxes drawn into this dir")] = None,
    detector: Annotated[str, typer.Option(help="animeface, lbpcascade or both (default: WAIFU_DETECTOR)")] = "",
) -> None:
    """Detect faces locally (no broker, no database) and show what was found."""
    from waifu.detect_view import detect_paths

    settings = get_settings()
    results = detect_paths(
        paths,
        as_json=as_json,
        annotate_dir=annotate,
        detector=detector or settings.detector,
        console=console,
        max_pixels=settings.max_image_pixels,
    )
    if any("error" in entry for entry in results):
        raise typer.Exit(1)


# --------------------------------------------------------------------------------- export ----
@app.command("export")
def export_cmd(
    directory: Annotated[Path, typer.Argument(help="where the dataset goes (replaced as a whole)")],
    fmt: Annotated[str, typer.Option("--format", help="imagefolder (+ metadata.jsonl) or jsonl")] = "imagefolder",
    characters: Annotated[str, typer.Option(help="only these characters (comma separated)")] = "",
    sources: Annotated[
        str, typer.Option(help="label sources: tag, manual, inferred (default), and doubtful, rejected")
    ] = "tag,manual,inferred",
    min_probability: Annotated[
        float | None, typer.Option(min=0, max=1, help="inferred labels only at this model probability or more")
    ] = None,
    since: Annotated[str, typer.Option(help="faces collected on or after this date (ISO, UTC)")] = "",
    until: Annotated[str, typer.Option(help="faces collected before this date (ISO, UTC)")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary")] = False,
) -> None:
    """Export the labelled faces as a dataset (train/ and test/ per character), incrementally and atomically."""
    from waifu.export.view import run_dataset_export

    _ensure_db()
    options = {"characters": characters, "sources": sources, "min_probability": min_probability}
    raise typer.Exit(run_dataset_export(directory, fmt, options | {"since": since, "until": until}, as_json, console))


@model_app.command("export")
def model_export_cmd(
    directory: Annotated[Path, typer.Argument(help="where the model goes (replaced as a whole)")],
    version: Annotated[
        int | None, typer.Option(min=1, max=2**63 - 1, help="model version (default: the current one)")
    ] = None,
    onnx: Annotated[bool, typer.Option(help="also write model.onnx (needs the export extra)")] = True,
) -> None:
    """Write a model as .keras, SavedModel, ONNX and model.json, for serving without this package."""
    from waifu.export.view import run_model_export

    _ensure_db()
    raise typer.Exit(run_model_export(directory, version, onnx, console))


if __name__ == "__main__":  # pragma: no cover
    app()
