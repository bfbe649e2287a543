"""Collection benchmark: the real test set (tests/testdata.py) through the fake safebooru at the default limits.

Runs the real path (scraper poll -> Redis -> Celery io worker processes -> download -> database) and
prints the achieved rate against the ceiling the configured limits allow. The ceiling is set by the slower
of the two limits: API requests at WAIFU_REQUESTS_PER_SECOND (the requests the poll actually needed) and
downloads at WAIFU_DOWNLOADS_PER_SECOND per host. A ratio near 1.0 means the limits, not the service,
decide the speed.

    python -m bench.collect [--workers 2] [--rps 1] [--dps 2]

Needs Redis (uses database 11 of WAIFU_BENCH_REDIS_URL, default redis://127.0.0.1:6379/11).
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
    p.add_argument("--workers", type=int, default=2, help="io worker processes")
    p.add_argument("--rps", type=float, default=1.0, help="WAIFU_REQUESTS_PER_SECOND")
    p.add_argument("--dps", type=float, default=2.0, help="WAIFU_DOWNLOADS_PER_SECOND")
    p.add_argument("--timeout", type=float, default=600.0)
    return p.parse_args()


async def main() -> int:
    args = parse_args()
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
    from tests.fake_safebooru import FakeSafebooru, load_illustrations

    console = Console()
    fake = FakeSafebooru()
    os.environ["WAIFU_SAFEBOORU_URL"] = await fake.start()
    reset_settings_cache()
    settings = get_settings()
    redis.Redis.from_url(settings.broker_url).flushdb()
    (tmp / "data").mkdir(parents=True)
    upgrade()
    posts = load_illustrations(fake)
    add_characters(sorted({p.tags.split()[1] for p in posts}))

    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", "io", "-c", str(args.workers),
         "--loglevel", "WARNING", "--without-mingle", "--without-gossip"],
        env={**os.environ}, cwd=ROOT, start_new_session=True,
    )
    try:
        await asyncio.sleep(3)  # let the worker connect; not part of the measured time
        started = time.monotonic()
        await poll_once(settings)
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
    table.add_row(str(done), str(api_requests), f"{elapsed:.1f}", f"{achieved:.2f}", f"{ceiling:.2f}",
                  f"{achieved / ceiling:.2f}")
    console.print(table)
    return 0 if done == n else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
