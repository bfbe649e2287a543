"""Collection benchmark: the real test set (tests/support/testdata.py) through the fake safebooru at the default limits.

Runs the real path (scraper poll -> Redis -> Celery io worker processes -> download -> database) and
prints the achieved rate against the ceiling the configured limits allow. The ceiling is set by the slower
of the two limits: API requests at WAIFU_REQUESTS_PER_SECOND (the requests the poll actually needed) and
downloads at WAIFU_DOWNLOADS_PER_SECOND per host. A ratio near 1.0 means the limits, not the service,
decide the speed.

    python -m bench.collect [--workers 2] [--rps 1] [--dps 2]

`--through crop` runs the whole pipeline instead (fake API -> download -> detect -> crop), started as
`waifu run` starts it (waifu.runner/waifu.pools: an io worker with a threads pool, a prefork cpu worker
with one process per core unless --cpu-processes), without beat or reconcile, on the 107 illustrations
`--copies` times (each extra copy re-encoded: a distinct file and md5), once per `--database`. It waits
until every post is terminal (or --timeout), then counts the rows left non-terminal (posts not done,
failed or skipped; faces still `detected`) and prints posts per minute against the ceiling measured in
the same run: min(download limit: the API requests the poll needed at --rps and the posts at --dps,
which overlap; detection ceiling: one-process seconds of the default detector, `both` + fallbacks, over
the same files (bench.pipeline.detection_seconds), divided by the cpu processes).

    python -m bench.collect --through crop [--database sqlite|postgresql|both] [--copies 2]

Needs Redis (uses database 11 of WAIFU_BENCH_REDIS_URL, default redis://127.0.0.1:6379/11); PostgreSQL
runs use a throw-away database on WAIFU_BENCH_POSTGRES_URL (bench.pipeline.fresh_database).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="io worker processes (download mode)")
    p.add_argument("--rps", type=float, default=1.0, help="WAIFU_REQUESTS_PER_SECOND")
    p.add_argument("--dps", type=float, default=2.0, help="WAIFU_DOWNLOADS_PER_SECOND")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (per database with --through crop)")
    p.add_argument(
        "--through",
        choices=["download", "crop"],
        default="download",
        help="download: the collection alone (default); crop: the whole pipeline as `waifu run` runs it",
    )
    p.add_argument(
        "--database",
        choices=["sqlite", "postgresql", "both"],
        default="sqlite",
        help="--through crop: the database(s) to run on",
    )
    p.add_argument("--copies", type=int, default=2, help="--through crop: times the 107 illustrations are posted")
    p.add_argument(
        "--cpu-processes",
        type=int,
        default=0,
        help="--through crop: prefork cpu processes (0: one per core, as `waifu run` plans)",
    )
    return p.parse_args()


async def main() -> int:
    args = parse_args()
    if args.through == "crop":
        return await full_pipeline(args)
    tmp = Path(tempfile.mkdtemp(prefix="waifu-bench-"))
    env = {
        "WAIFU_DATA_DIR": str(tmp / "data"),
        "WAIFU_DATABASE_URL": f"sqlite:///{tmp / 'data' / 'waifu.db'}",
        "WAIFU_BROKER_URL": os.environ.get("WAIFU_BENCH_REDIS_URL", "redis://127.0.0.1:6379/11"),
        "WAIFU_REQUESTS_PER_SECOND": str(args.rps),
        "WAIFU_DOWNLOADS_PER_SECOND": str(args.dps),
        "WAIFU_BACKFILL_PAGES": "50",
        "WAIFU_LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)

    import redis
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table
    from sqlmodel import select

    from core.settings import get_settings, reset_settings_cache
    from db.engine import session_scope
    from db.migrate import upgrade
    from db.models import Post, PostState
    from scraper.characters import add_characters
    from scraper.poller import poll_once
    from tests.support.fake_safebooru import FakeSafebooru, load_illustrations
    from waifu.celery_argv import celery_argv
    from waifu.cli import enqueue_downloads

    console = Console()
    fake = FakeSafebooru()
    os.environ["WAIFU_DEFAULT_SITE_URL"] = await fake.start()
    reset_settings_cache()
    settings = get_settings()
    redis.Redis.from_url(settings.broker_url).flushdb()
    (tmp / "data").mkdir(parents=True)
    upgrade()
    posts = load_illustrations(fake)
    add_characters(sorted({p.tags.split()[1] for p in posts}))

    worker = subprocess.Popen(
        celery_argv(
            [
                "worker",
                "-Q",
                "io",
                "-c",
                str(args.workers),
                "--loglevel",
                "WARNING",
                "--without-mingle",
                "--without-gossip",
            ]
        ),
        env={**os.environ},
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        await asyncio.sleep(3)  # let the worker connect; not part of the measured time
        started = time.monotonic()
        await poll_once(settings, enqueue_downloads)
        api_requests = len(fake.api_requests())
        done = 0
        with Progress(console=console, transient=True) as progress:
            bar = progress.add_task("downloading", total=len(posts))
            while done < len(posts) and time.monotonic() - started < args.timeout:
                await asyncio.sleep(0.25)
                with session_scope() as session:
                    done = len(session.exec(select(Post.id).where(Post.state != PostState.discovered)).all())
                progress.update(bar, completed=done)
        elapsed = time.monotonic() - started
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
        await fake.stop()

    n = len(posts)
    # the limits allow at best: every API request spaced 1/rps, every download spaced 1/dps (same host);
    # the two overlap, so the slower one sets the floor of the wall time
    floor = max(api_requests / args.rps, n / args.dps)
    achieved, ceiling = n / elapsed, n / floor
    table = Table(title=f"collection of the real test set ({n} posts, {args.workers} io workers)")
    for col in ("posts done", "API requests", "elapsed s", "achieved posts/s", "ceiling posts/s", "ratio"):
        table.add_column(col, justify="right")
    table.add_row(
        str(done), str(api_requests), f"{elapsed:.1f}", f"{achieved:.2f}", f"{ceiling:.2f}", f"{achieved / ceiling:.2f}"
    )
    console.print(table)
    return 0 if done == n else 1


# ------------------------------------------------------------------ --through crop: the whole pipeline ----
LOAD_EVERY = 5.0  # seconds: how often the load average is sampled during a run


def reason_group(reason: str | None) -> str:
    """A reason without the ids and hashes that make every row's unique."""
    import re

    text = re.sub(r"\b[0-9a-f]{32,64}\b", "<hash>", reason or "(no reason)")
    return re.sub(r"\b\d+\b", "N", text)[:120]


def leftovers() -> dict:
    """Read after a run: posts not terminal, faces still `detected`, failures and skips grouped by reason,
    rows per state."""
    from sqlmodel import func, select

    from db.engine import session_scope
    from db.models import TERMINAL_STATES, Face, FaceState, Post, PostState

    with session_scope(readonly=True) as session:
        posts = session.exec(
            select(func.count()).select_from(Post).where(Post.state.not_in([str(s) for s in TERMINAL_STATES]))
        ).one()
        faces = session.exec(select(func.count()).select_from(Face).where(Face.state == FaceState.detected)).one()
        failures: dict[str, int] = {}
        for state, reason in session.exec(
            select(Post.state, Post.reason).where(Post.state.in_([PostState.failed, PostState.skipped]))
        ).all():
            key = f"post {state}: {reason_group(reason)}"
            failures[key] = failures.get(key, 0) + 1
        for (reason,) in session.exec(select(Face.reason).where(Face.state == FaceState.failed)).all():
            key = f"face failed: {reason_group(reason)}"
            failures[key] = failures.get(key, 0) + 1
        # not failures, but the rest of the story: rows in each final state
        states = dict(session.exec(select(Post.state, func.count()).group_by(Post.state)).all())
        face_states = dict(session.exec(select(Face.state, func.count()).group_by(Face.state)).all())
    return {
        "stuck_posts": int(posts),
        "stuck_faces": int(faces),
        "failures": failures,
        "post_states": states,
        "face_states": face_states,
    }


def progress_counts() -> tuple[int, int]:
    """(posts terminal, posts still waiting for their download)."""
    from sqlmodel import func, select

    from db.engine import session_scope
    from db.models import TERMINAL_STATES, Post, PostState

    with session_scope(readonly=True) as session:
        terminal = session.exec(
            select(func.count()).select_from(Post).where(Post.state.in_([str(s) for s in TERMINAL_STATES]))
        ).one()
        waiting = session.exec(select(func.count()).select_from(Post).where(Post.state == PostState.discovered)).one()
    return int(terminal), int(waiting)


def wait_for_workers(expected: int, supervisor, timeout: float = 90.0) -> None:
    """Until every planned worker answers a ping (start-up is not part of the measured time)."""
    from worker.app import app

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = supervisor.first_exited()
        if dead is not None:
            raise RuntimeError(f"{dead.name} exited during start-up ({dead.proc.returncode})")
        replies = app.control.ping(timeout=1.0) or []
        if len({name for reply in replies for name in reply}) >= expected:
            return
        time.sleep(0.5)
    raise RuntimeError(f"workers did not answer a ping within {timeout:.0f}s")


async def pipeline_run(kind: str, files: list[tuple[str, Path]], args: argparse.Namespace, tmp: Path, console) -> dict:
    """One database: a fresh database and data dir, a fresh fake site holding `files`, the workers `waifu
    run` would start (no beat, no scraper loop: one poll in this process), until every post is terminal."""
    import redis
    from rich.progress import Progress

    from bench.pipeline import fresh_database
    from core.settings import get_settings, reset_settings_cache
    from db.migrate import upgrade
    from scraper.characters import add_characters
    from scraper.poller import poll_once
    from tests.support.fake_safebooru import FakeSafebooru, publish
    from waifu.celery_argv import worker_commands
    from waifu.cli import enqueue_downloads
    from waifu.pools import plan_workers
    from waifu.supervisor import ChildLog, Supervisor

    data = tmp / f"data-{kind}"
    database, drop = fresh_database(kind, tmp)
    fake = FakeSafebooru()
    per_tag: dict[str, list[tuple[bytes, str]]] = {}
    for tag, path in files:
        per_tag.setdefault(tag, []).append((path.read_bytes(), path.suffix.lower()))
    posts = publish(fake, per_tag)
    os.environ.update(
        {"WAIFU_DATA_DIR": str(data), "WAIFU_DATABASE_URL": database, "WAIFU_DEFAULT_SITE_URL": await fake.start()}
    )
    reset_settings_cache()
    settings = get_settings()
    redis.Redis.from_url(settings.broker_url).flushdb()
    data.mkdir(parents=True)
    upgrade()
    add_characters(sorted(per_tag))

    specs = plan_workers(("io", "cpu"), concurrency=args.cpu_processes)  # what `waifu run` plans, minus train
    output = ChildLog(data / "logs" / "workers.log")
    supervisor = Supervisor(env={**os.environ, "PYTHONUNBUFFERED": "1"}, output=output)
    loads: list[tuple[float, float, float]] = []
    n, done, elapsed, api_requests, collected, behind = len(posts), 0, 0.0, 0, None, 0
    try:
        for name, argv in worker_commands(specs, "WARNING"):
            supervisor.start(name, argv)
        await asyncio.to_thread(wait_for_workers, len(specs), supervisor)
        started = last_load = time.monotonic()
        loads.append(os.getloadavg())
        poll = asyncio.ensure_future(poll_once(settings, enqueue_downloads))
        with Progress(console=console, transient=True) as progress:
            bar = progress.add_task(f"{kind}: posts terminal", total=n)
            while done < n and time.monotonic() - started < args.timeout:
                await asyncio.sleep(0.25)
                if poll.done():
                    poll.result()  # a poll that raised stops the run
                done, waiting = await asyncio.to_thread(progress_counts)
                if collected is None and waiting == 0 and poll.done():
                    collected = time.monotonic() - started  # every post downloaded (or refused)
                    behind = n - done  # still in detect or crop then: the cpu side's backlog
                progress.update(bar, completed=done)
                if time.monotonic() - last_load >= LOAD_EVERY:
                    loads.append(os.getloadavg())
                    last_load = time.monotonic()
                dead = supervisor.first_exited()
                if dead is not None:
                    console.print(f"[red]{dead.name} exited ({dead.proc.returncode}); see {output.path}[/red]")
                    break
        elapsed = time.monotonic() - started
        loads.append(os.getloadavg())
        if not poll.done():
            poll.cancel()
        report = (await asyncio.gather(poll, return_exceptions=True))[0]
        api_requests = len(fake.api_requests())
        # workers stop before anything is counted: no step finishes behind the count
        await asyncio.to_thread(supervisor.stop_all)
        left = await asyncio.to_thread(leftovers)
    finally:
        await asyncio.to_thread(supervisor.stop_all)  # a no-op once stopped
        output.close()
        await fake.stop()
        drop()
    lines = output.path.read_text(errors="replace").splitlines()
    return {
        "kind": kind,
        "posts": n,
        "terminal": done,
        "seconds": elapsed,
        "collected": collected,
        "behind": behind,
        "api_requests": api_requests,
        "busy": sum("database busy, retrying" in line for line in lines),
        "problems": sum(any(f" {level} " in line for level in ("WARNING", "ERROR", "CRITICAL")) for line in lines),
        "poll_errors": getattr(report, "errors", [repr(report)]),
        **left,
        "loads": loads,
        "log": output.path,
        "processes": next(s.concurrency for s in specs if s.pool == "prefork"),
        "workers": ", ".join(f"{s.kind}: {s.pool} x{s.concurrency}" for s in specs),
    }


def pipeline_table(run: dict, alone: float, args: argparse.Namespace):
    from rich.table import Table

    n, seconds = run["posts"], run["seconds"]
    download_floor = max(run["api_requests"] / args.rps, n / args.dps)  # the two overlap (see the download mode)
    detection_floor = alone / min(run["processes"], os.cpu_count() or 1)
    floor = max(download_floor, detection_floor)
    limit = "download" if download_floor >= detection_floor else "detection"
    achieved, ceiling = 60 * run["terminal"] / seconds, 60 * n / floor
    ones = [x[0] for x in run["loads"]]
    table = Table(
        title=f"full pipeline on {run['kind']}: fake API -> download -> detect -> crop ({n} posts; {run['workers']})",
        show_header=False,
    )
    table.add_column("", justify="left")
    table.add_column("", justify="right")
    stuck = run["stuck_posts"] + run["stuck_faces"]
    rows = [
        ("posts (terminal / listed)", f"{run['terminal']} / {n}"),
        ("seconds (first API request to last post terminal)", f"{seconds:.1f}"),
        ("posts/min", f"{achieved:.1f}"),
        (
            "  seconds until no post waited for its download",
            "-" if run["collected"] is None else f"{run['collected']:.1f}",
        ),
        ("  posts still in detect or crop then", "-" if run["collected"] is None else str(run["behind"])),
        (
            f"download limit posts/min ({run['api_requests']} API requests at {args.rps:g}/s, "
            f"{n} files at {args.dps:g}/s)",
            f"{60 * n / download_floor:.1f}",
        ),
        (
            f"detection ceiling posts/min ({alone:.1f} s one process / {min(run['processes'], os.cpu_count() or 1)})",
            f"{60 * n / detection_floor:.1f}",
        ),
        ("ceiling posts/min", f"{ceiling:.1f} ({limit})"),
        ("ratio", f"{achieved / ceiling:.2f}"),
        ("rows left non-terminal (posts + faces `detected`)", f"{stuck} ({run['stuck_posts']} + {run['stuck_faces']})"),
        ("worker log: database-busy retries / warning+error lines", f"{run['busy']} / {run['problems']}"),
        ("post states", ", ".join(f"{k} {v}" for k, v in sorted(run["post_states"].items()))),
        ("face states", ", ".join(f"{k} {v}" for k, v in sorted(run["face_states"].items()))),
        ("load average 1 min during the run (start / max / end)", f"{ones[0]:.2f} / {max(ones):.2f} / {ones[-1]:.2f}"),
    ]
    if run["poll_errors"]:
        rows.append(("poll errors", "; ".join(run["poll_errors"])))
    groups = sorted(run["failures"].items(), key=lambda kv: (-kv[1], kv[0]))
    rows += [(f"  {reason}", str(count)) for reason, count in groups] or [("failures", "none")]
    if groups:
        rows.insert(len(rows) - len(groups), ("failures and skips by reason", ""))
    for row in rows:
        table.add_row(*row)
    return table, stuck


async def full_pipeline(args: argparse.Namespace) -> int:
    import shutil

    os.environ.update(
        {
            "WAIFU_BROKER_URL": os.environ.get("WAIFU_BENCH_REDIS_URL", "redis://127.0.0.1:6379/11"),
            "WAIFU_REQUESTS_PER_SECOND": str(args.rps),
            "WAIFU_DOWNLOADS_PER_SECOND": str(args.dps),
            "WAIFU_BACKFILL_PAGES": "50",
            "WAIFU_DETECTOR": "both",  # the default, whatever the calling shell says
            "WAIFU_DETECTOR_FALLBACKS": "true",
            "WAIFU_LOG_LEVEL": "WARNING",
        }
    )
    from rich.console import Console

    from bench.pipeline import detection_seconds, illustrations
    from tests.support.testdata import raw_images

    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="waifu-bench-full-"))
    keep = False
    try:
        tags = [tag for tag, _path in raw_images()]
        paths = illustrations(args.copies, tmp / "copies")  # the raw set, then each copy in the same order
        files = [(tags[i % len(tags)], path) for i, path in enumerate(paths)]
        before = os.getloadavg()
        console.print(
            f"detection alone, one process, `both` + fallbacks, {len(paths)} files "
            f"(load average {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}) ..."
        )
        alone = detection_seconds(paths, "both")
        after = os.getloadavg()
        console.print(f"  {alone:.1f} s (load average after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f})")
        kinds = ("sqlite", "postgresql") if args.database == "both" else (args.database,)
        code = 0
        for kind in kinds:
            run = await pipeline_run(kind, files, args, tmp, console)
            table, stuck = pipeline_table(run, alone, args)
            console.print(table)
            if stuck or run["terminal"] < run["posts"]:
                code, keep = 1, True
                console.print(f"worker log kept: {run['log']}")
        return code
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
