"""What the stall check (waifu.stalls) adds to `waifu healthcheck`, which compose runs every 30 s per worker.

Fills a database with a large collection (--posts done posts with a face each, --waiting posts waiting
for detection and as many for download) and measures, in the same run:
- the CPU seconds (user + system) of `waifu healthcheck` without and with `--queues io,cpu`, as processes
  (median of --repeat), and their ratio;
- the wall time of the stall queries alone (waifu.stalls.find_stalls, median), against a baseline query
  measured on the same database: one count of all posts.
Twice: with a working pipeline (detect handed a post on a minute ago) and with a stalled one.

    python -m bench.stall_check [--database sqlite|postgresql|both] [--posts 200000] [--waiting 20000]

PostgreSQL runs use a throw-away database on WAIFU_BENCH_POSTGRES_URL (bench.pipeline.fresh_database).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BROKER = os.environ.get("WAIFU_BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")


def fill(posts: int, waiting: int) -> None:
    from sqlalchemy import insert

    from db.engine import session_scope
    from db.models import Face, Post, PostState, utcnow

    now = utcnow()
    rows, faces = [], []
    for i in range(1, posts + 1):  # the collection so far, spread over the last 30 days
        at = now - timedelta(seconds=30 * 86400 * (posts - i) / posts + 3600)
        rows.append(_post(i, PostState.done, at, stored=True))
        faces.append(_face(i, at))
    for i in range(posts + 1, posts + waiting + 1):  # waiting for detection for two hours
        rows.append(_post(i, PostState.downloaded, now - timedelta(hours=2), stored=True))
    for i in range(posts + waiting + 1, posts + 2 * waiting + 1):  # waiting for download
        rows.append(_post(i, PostState.discovered, now - timedelta(hours=2), stored=False, attempts=0))
    with session_scope() as session:
        for start in range(0, len(rows), 5000):
            session.execute(insert(Post), rows[start : start + 5000])
        for start in range(0, len(faces), 5000):
            session.execute(insert(Face), faces[start : start + 5000])


def _post(i: int, state: str, at, stored: bool, attempts: int = 1) -> dict:
    return dict(
        id=i,
        site="safebooru",
        remote_id=i,
        md5=f"{i:032x}",
        file_url=f"https://safebooru.org//images/{i}.jpg",
        image="",
        directory="",
        rating="",
        tags="",
        source="",
        state=state,
        attempts=attempts,
        stored_path=f"images/{i}.png" if stored else None,
        created_at=at,
        updated_at=at,
    )


def _face(i: int, at) -> dict:
    box = dict(x=0, y=0, w=10, h=10, crop_left=0, crop_top=0, crop_right=10, crop_bottom=10)
    return dict(id=i, post_id=i, detector="animeface", state="ready", created_at=at, updated_at=at, **box)


def set_progress(progressing: bool) -> None:
    """A working pipeline: one post detected and one downloaded a minute ago; a stalled one: nothing since."""
    from sqlmodel import update

    from db.engine import session_scope
    from db.models import Post, utcnow

    at, long_ago = utcnow() - timedelta(minutes=1), utcnow() - timedelta(days=40)
    with session_scope() as session:
        for post_id, state in ((1, "detected"), (2, "downloaded")):
            values = {"state": state, "updated_at": at} if progressing else {"state": "done", "updated_at": long_ago}
            session.execute(update(Post).where(Post.id == post_id).values(**values))


def cpu_seconds(args: list[str], env: dict[str, str], repeat: int) -> tuple[float, int, str]:
    samples, code, err = [], 0, ""
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            [sys.executable, "-m", "waifu.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        samples.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        code, err = done.returncode, (done.stderr or done.stdout).strip()
    return statistics.median(samples), code, err


def query_seconds(repeat: int) -> tuple[float, float]:
    from sqlalchemy import func
    from sqlmodel import select

    from db.engine import session_scope
    from db.models import Post
    from waifu.stalls import find_stalls

    stall, count = [], []
    find_stalls(900)  # the engine's first connection is not the check's cost
    for _ in range(repeat):
        started = time.perf_counter()
        find_stalls(900)
        stall.append(time.perf_counter() - started)
        started = time.perf_counter()
        with session_scope(readonly=True) as session:
            session.exec(select(func.count()).select_from(Post)).one()
        count.append(time.perf_counter() - started)
    return statistics.median(stall), statistics.median(count)


def run(kind: str, posts: int, waiting: int, repeat: int) -> None:
    from bench.pipeline import fresh_database
    from core.settings import reset_settings_cache
    from db.migrate import upgrade

    with tempfile.TemporaryDirectory() as tmp:
        url, drop = fresh_database(kind, Path(tmp))
        env = {**os.environ, "WAIFU_DATABASE_URL": url, "WAIFU_BROKER_URL": BROKER, "WAIFU_DATA_DIR": tmp}
        os.environ.update(env)
        reset_settings_cache()
        try:
            upgrade(url)
            started = time.perf_counter()
            fill(posts, waiting)
            print(f"{kind}: {posts} done posts, 2 x {waiting} waiting, filled in {time.perf_counter() - started:.0f} s")
            for progressing in (True, False):
                set_progress(progressing)
                base, _, _ = cpu_seconds(["healthcheck"], env, repeat)
                check, code, line = cpu_seconds(["healthcheck", "--queues", "io,cpu"], env, repeat)
                stall_s, count_s = query_seconds(repeat)
                print(
                    f"  {'working' if progressing else 'stalled'}: healthcheck CPU {base * 1000:.0f} ms, "
                    f"with --queues io,cpu {check * 1000:.0f} ms (ratio {check / base:.2f}, exit {code}: {line[:90]})"
                )
                print(
                    f"    stall queries {stall_s * 1000:.1f} ms against one count of all posts "
                    f"{count_s * 1000:.1f} ms (ratio {stall_s / count_s:.2f})"
                )
        finally:
            from db.engine import engine_for

            engine_for(url).dispose()
            drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--posts", type=int, default=200_000)
    parser.add_argument("--waiting", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for kind in ("sqlite", "postgresql") if args.database == "both" else (args.database,):
        run(kind, args.posts, args.waiting, args.repeat)


if __name__ == "__main__":
    main()
