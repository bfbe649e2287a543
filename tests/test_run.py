"""`waifu run` (what `make run` starts): embedded defaults, real collection, clean Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest
from sqlmodel import Session, select

from db.engine import engine_for
from db.models import Post, PostState
from tests.conftest import PROJECT_ROOT
from tests.fake_safebooru import SHARED_DIR, FakeSafebooru, load_shared
from tests.test_end_to_end import run_cli

pytestmark = pytest.mark.slow


def downloaded_count(url: str) -> int:
    try:
        with Session(engine_for(url)) as session:
            return len(session.exec(select(Post).where(Post.state == PostState.done)).all())
    except Exception:  # the file or its tables may not exist yet
        return 0


async def test_run_uses_embedded_redis_collects_and_stops_cleanly(fake: FakeSafebooru, tmp_path) -> None:
    posts = load_shared(fake, limit_per_tag=3)
    tags = sorted({p.tags.split()[1] for p in posts})
    data_dir = tmp_path / "data"
    env = {
        "WAIFU_DATA_DIR": str(data_dir),
        "WAIFU_DATABASE_URL": "",  # the embedded default: SQLite under the data dir
        "WAIFU_BROKER_URL": "redis://127.0.0.1:1/0",  # nothing listens there: embedded Redis must start
        "WAIFU_EMBEDDED_REDIS": "true",
        "WAIFU_SAFEBOORU_URL": fake.base_url,
        "WAIFU_REQUESTS_PER_SECOND": "20",
        "WAIFU_DOWNLOADS_PER_SECOND": "50",
        "WAIFU_LBPCASCADE_PATH": str(SHARED_DIR / "models" / "lbpcascade_animeface.xml"),
    }
    assert (await run_cli(env, "characters", "add", *tags))[0] == 0

    log_path = tmp_path / "run.log"  # a file, not a pipe: nobody must block on a full pipe
    log_file = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "waifu.cli", "run", env={**os.environ, **env}, cwd=PROJECT_ROOT,
        stdout=log_file, stderr=log_file, start_new_session=True,
    )
    url = f"sqlite:///{data_dir / 'waifu.db'}"
    try:
        deadline = time.monotonic() + 180
        while downloaded_count(url) < len(posts):
            assert proc.returncode is None, "waifu run exited early: " + log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, (f"only {downloaded_count(url)} of {len(posts)} done: "
                                                 + log_path.read_text()[-3000:])
            await asyncio.sleep(0.5)
        assert (data_dir / "redis" / "redis.log").exists(), "the embedded Redis keeps its files in the data dir"

        proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal does
        await asyncio.wait_for(proc.wait(), 90)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        log_file.close()
    stderr = log_path.read_text(errors="replace")
    assert proc.returncode == 0, stderr[-3000:]
    for child in ("worker-io-cpu", "worker-train", "beat", "scraper"):
        assert f"stopped child={child}" in stderr
    assert "Traceback" not in stderr



async def test_children_do_not_outlive_a_killed_runner(tmp_path) -> None:
    """Even `kill -9` of `waifu run` leaves no orphan worker, beat, scraper or Redis behind."""
    env = {"WAIFU_DATA_DIR": str(tmp_path / "data"), "WAIFU_DATABASE_URL": "",
           "WAIFU_BROKER_URL": "redis://127.0.0.1:1/0", "WAIFU_EMBEDDED_REDIS": "true"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "waifu.cli", "run", env={**os.environ, **env}, cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )

    def children() -> list[int]:
        import subprocess as sp

        out = sp.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    deadline = time.monotonic() + 60
    while len(children()) < 5:  # embedded redis + two workers + beat + scraper
        assert time.monotonic() < deadline, "waifu run did not start its children"
        await asyncio.sleep(0.5)
    pids = children()
    proc.kill()
    await proc.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    deadline = time.monotonic() + 60
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"orphans left: {[p for p in pids if alive(p)]}"
        await asyncio.sleep(0.5)
