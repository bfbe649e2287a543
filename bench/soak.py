"""Soak run with chaos (issue 17, section 5): the whole service as `waifu run` starts it, for a set time, against
the fake safebooru publishing new posts all along, while processes are killed and services restarted. Writes its
report as it goes (markdown and JSON, rewritten every minute), so a stopped run still tells what it saw.

    nice -n 10 .venv/bin/python -m bench.soak --minutes 30 --db sqlite
    nice -n 10 .venv/bin/python -m bench.soak --minutes 40 --db postgres --report /tmp/soak-pg.md

What it owns (nothing touches the machine's shared services): a redis-server with append-only persistence on its
own port and folder; on `--db postgres` a PostgreSQL cluster of its own (initdb/pg_ctl from
/usr/lib/postgresql/*/bin); the fake safebooru (tests/support/fake_safebooru.py) serving the real test images
(WAIFU_TEST_DATA, tests/support/testdata.py); `waifu run` in a data dir under the work dir.

Published all along: 1-2 posts every `--publish-every` seconds, a few with file faults (503/429 once, a slow
drip, 404, truncated, wrong md5) and API faults; bursts longer than a page with one unusable entry (an md5 that
is no md5) on a full page.

Chaos on a schedule (fractions of the run, see `schedule`): SIGKILL of a random worker process every
`--kill-every` seconds (a prefork pool child; with --kill-mains also a worker's main process: then `waifu run`
stops everything and the soak restarts it, as compose would); one Redis restart (its append-only file kept);
one PostgreSQL restart (postgres run); one broker flush (every queued message lost); one picture whose face
detection hangs like C code that never returns (a SOAK-ONLY hook, bench/soak_hook/sitecustomize.py, on the
service's PYTHONPATH: the service has no such setting); one 16-bit PNG near the pixel cap (`--big-png`, 0: none).

Report (bench/soak_report.py): posts published against rows and terminal rows; posts lost; the longest time
any row waited without progress against the recovery bound; tasks ended by a time limit; errors that reached
no row; RSS of every long-lived process, first against last 10 minutes; verdict lines for the done criteria.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.soak_report import Observer, render_markdown
from bench.soak_services import PROJECT_ROOT, PostgresCluster, RedisServer, ServiceRun, service_tree
from bench.soak_site import HANG_SIZE, Publisher

TAGS = ["nishikino_maki", "sakurauchi_riko", "takimoto_hifumi"]
HOOK_DIR = Path(__file__).resolve().parent / "soak_hook"
SAMPLE_EVERY = 10.0
REPORT_EVERY = 60.0
PAGE_SIZE = 10  # small pages, so bursts of 16 posts are gaps longer than a page
POLL_INTERVAL = 15.0
DEFAULT_MAX_PIXELS = 80_000_000  # core.settings max_image_pixels default


def recovery_bound() -> float:
    """The longest a row may wait with no progress, from the service's defaults (core.settings): a claim
    outlived (claim_timeout_s 120 s), the stuck threshold (stuck_after_s 120 s), two reconcile periods (60 s each)
    and one step's own run (240 s, the longest sensible step on 2 cores)."""
    return 120 + 120 + 2 * 60 + 240


def schedule(total: float, kill_every: float, postgres: bool, withhold: bool) -> list[tuple[float, str]]:
    events = [(0.15 * total, "hang"), (0.3 * total, "big_png"), (0.4 * total, "redis_restart")]
    events += [(0.6 * total, "flush"), (0.2 * total, "burst"), (0.5 * total, "burst"), (0.8 * total, "burst")]
    if postgres:
        events.append((0.7 * total, "pg_restart"))
    if withhold:
        events.append((1.0, "withhold"))
    t = min(120.0, kill_every)
    while t < total - 30:
        events.append((t, "sigkill"))
        t += kill_every
    t = 90.0
    while t < total:
        events.append((t, "api_fault"))
        t += 180.0
    return sorted(events)


def service_env(data_dir: Path, broker: str, site_url: str, db_url: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("WAIFU_") or k.startswith("WAIFU_TEST_DATA")}
    return {
        **keep,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HOOK_DIR), os.environ.get("PYTHONPATH", "")])),
        "WAIFU_SOAK_HANG_SIZE": f"{HANG_SIZE[0]}x{HANG_SIZE[1]}",  # the soak-only hook's trigger
        "WAIFU_DATA_DIR": str(data_dir),
        "WAIFU_DATABASE_URL": db_url,  # "" = the embedded default, SQLite under the data dir
        "WAIFU_BROKER_URL": broker,
        "WAIFU_EMBEDDED_REDIS": "false",  # the soak's own Redis, which it restarts: never a substitute
        "WAIFU_DEFAULT_SITE_URL": site_url,
        "WAIFU_REQUESTS_PER_SECOND": "5",
        "WAIFU_DOWNLOADS_PER_SECOND": "5",
        "WAIFU_PAGE_SIZE": str(PAGE_SIZE),
        "WAIFU_POLL_INTERVAL_S": str(POLL_INTERVAL),
        "WAIFU_DOWNLOAD_BACKOFF_S": "1",
        "WAIFU_API_BACKOFF_S": "0.5",
        "WAIFU_API_BACKOFF_MAX_S": "10",
        "WAIFU_RETRAIN_INTERVAL_S": "100000000",  # no TensorFlow training in a soak of the collection
        "WAIFU_WEB_PORT": "0",
        "WAIFU_LOG_LEVEL": "INFO",
    }


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.total = args.minutes * 60
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="waifu-soak-")).resolve()
        self.report_md = Path(args.report or self.work / "soak-report.md").resolve()
        self.report_json = self.report_md.with_suffix(".json")
        self.random = random.Random(args.seed)
        self.redis = RedisServer(self.work / "redis")
        self.pg = PostgresCluster(self.work / "pg") if args.db == "postgres" else None
        self.data_dir = self.work / "data"

    async def run(self) -> dict:
        from tests.support.fake_safebooru import FakeSafebooru
        from tests.support.testdata import raw_images

        self.work.mkdir(parents=True, exist_ok=True)
        self.redis.start()
        if self.pg:
            await asyncio.to_thread(self.pg.start)
        db_url = self.pg.url if self.pg else ""
        observed_db = db_url or f"sqlite:///{self.data_dir / 'waifu.db'}"
        fake = FakeSafebooru(slow_seconds=20.0)
        site_url = await fake.start()
        self.publisher = Publisher(fake, raw_images(), TAGS, self.args.seed)
        self.publisher.publish(self.args.initial_posts)
        env = service_env(self.data_dir, self.redis.url, site_url, db_url)
        env["WAIFU_SOAK_HANG_LOG"] = str(self.work / "hangs.log")
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "waifu.cli", "characters", "add", *TAGS],
            env=env,
            cwd=PROJECT_ROOT,
            check=True,
            capture_output=True,
        )
        self.service = ServiceRun(env, self.work / "waifu-run.out", concurrency=self.args.concurrency)
        self.service.start()
        lost_after = self.args.lost_after or 2 * POLL_INTERVAL + 120
        self.observer = Observer(
            observed_db,
            self.data_dir / "logs" / "waifu-run.log",
            self.publisher.ledger,
            recovery_bound(),
            lost_after,
            hang_log=self.work / "hangs.log",
        )
        print(
            f"soak: {self.args.minutes} min on {self.args.db}; work dir {self.work}; report {self.report_md}",
            flush=True,
        )
        try:
            await self._loop(fake)
        finally:
            await asyncio.to_thread(self.service.stop)
            self.observer.scan_log()
            await asyncio.to_thread(self.observer.sample_rows)
            data = self._write(final=True)
            self.redis.stop()
            if self.pg:
                await asyncio.to_thread(self.pg.stop)
            await fake.stop()
        return data

    async def _loop(self, fake) -> None:
        events = schedule(self.total, self.args.kill_every, self.pg is not None, self.args.withhold_one)
        start = time.monotonic()
        next_publish = next_sample = next_report = 0.0
        while (elapsed := time.monotonic() - start) < self.total:
            while events and events[0][0] <= elapsed:
                _, name = events.pop(0)
                await self._chaos(name)
            if elapsed >= next_publish:
                self.publisher.publish(self.random.randint(1, 2))
                next_publish = elapsed + self.args.publish_every
            if elapsed >= next_sample:
                await self._sample()
                next_sample = elapsed + SAMPLE_EVERY
            if elapsed >= next_report:
                self._write(final=False)
                next_report = elapsed + REPORT_EVERY
            await asyncio.sleep(1.0)

    async def _sample(self) -> None:
        code = self.service.exited()
        if code is not None:
            self.observer.note_chaos("service exited", f"code {code}; restarted")
            if self.redis.ping():
                self.service.start()
        roles = service_tree(self.service.proc.pid) if self.service.proc else {}
        extra = {self.redis.proc.pid: "redis-server"} if self.redis.proc else {}
        if self.pg and (pid := self.pg.postmaster_pid()):
            extra[pid] = "postgres"
        self.observer.sample_rss(roles, extra)
        self.observer.scan_log()
        await asyncio.to_thread(self.observer.sample_rows)

    async def _chaos(self, name: str) -> None:
        obs, pub = self.observer, self.publisher
        if name == "sigkill":
            await asyncio.to_thread(obs.sample_rows)
            obs.snapshot_claims()
            roles = service_tree(self.service.proc.pid) if self.service.proc else {}
            # pool children by default: a worker's main process dying makes `waifu run` restart every process,
            # and then none lives long enough to have its RSS judged (--kill-mains adds them)
            workers = [
                (pid, role)
                for pid, role in roles.items()
                if role.startswith("worker-") and (self.args.kill_mains or role.endswith("/pool"))
            ]
            if workers:
                pid, role = self.random.choice(workers)
                try:
                    os.kill(pid, signal.SIGKILL)
                    obs.note_chaos("sigkill", f"{role} pid {pid}")
                except ProcessLookupError:
                    pass
        elif name == "redis_restart":
            await asyncio.to_thread(self.redis.restart)
            obs.note_chaos("redis restart", f"append-only, port {self.redis.port}")
        elif name == "pg_restart":
            await asyncio.to_thread(self.pg.restart)
            obs.note_chaos("postgres restart", "pg_ctl restart -m fast")
        elif name == "flush":
            keys = await asyncio.to_thread(self.redis.flush)
            obs.note_chaos("broker flush", f"{keys} keys dropped")
        elif name == "hang":
            p = pub.hang_picture()
            obs.note_chaos("hang picture", f"post {p.id} ({HANG_SIZE[0]}x{HANG_SIZE[1]}, soak-only hook)")
        elif name == "big_png" and self.args.big_png > 0:
            p = await asyncio.to_thread(pub.big_png, int(self.args.big_png * 1_000_000))
            obs.note_chaos("16-bit PNG", f"post {p.id}, {self.args.big_png} Mpx")
        elif name == "burst":
            posts = pub.burst(PAGE_SIZE)
            bad = [p.id for p in posts if not p.usable]
            obs.note_chaos(
                "burst", f"{len(posts)} posts {posts[0].id}..{posts[-1].id} on {posts[0].tag}, unusable {bad}"
            )
        elif name == "api_fault":
            obs.note_chaos("api fault", pub.api_fault())
        elif name == "withhold":
            p = pub.withheld()
            obs.note_chaos("withheld", f"post {p.id} counted as published, never listed")

    def _write(self, final: bool) -> dict:
        data = self.observer.report(final=final)
        data["db"] = self.args.db
        data["work_dir"] = str(self.work)
        for path, body in (
            (self.report_json, json.dumps(data, indent=1, default=str)),
            (self.report_md, render_markdown(data)),
        ):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(body)
            tmp.replace(path)
        return data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--report", default="", help="markdown report path (JSON beside it); default in the work dir")
    parser.add_argument("--workdir", default="", help="default: a new temp dir (kept: logs, database)")
    parser.add_argument("--kill-every", type=float, default=180.0, help="seconds between two SIGKILLs")
    parser.add_argument(
        "--kill-mains", action="store_true", help="SIGKILL may hit a worker's main process too (restarts the service)"
    )
    parser.add_argument("--publish-every", type=float, default=20.0, help="seconds between two publications")
    parser.add_argument("--initial-posts", type=int, default=20)
    parser.add_argument(
        "--big-png", type=float, default=DEFAULT_MAX_PIXELS * 0.95 / 1e6, help="megapixels of the 16-bit PNG (0: none)"
    )
    parser.add_argument("--concurrency", type=int, default=2, help="processes of the cpu worker")
    parser.add_argument("--lost-after", type=float, default=0.0, help="seconds after which a post with no row is lost")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument(
        "--withhold-one",
        action="store_true",
        help="count one post as published but never list it (checks the lost accounting)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = asyncio.run(Soak(args).run())
    print("\n".join(data["verdict"]))
    return 0 if all(v.startswith("PASS") for v in data["verdict"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
