"""Limits that must hold across processes, proved with two processes: a second scraper cannot double the
rate a site sees (it refuses to start while one runs), and the first one's requests stay under the limit.
The per-host download limit across two processes is in tests/test_download.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys

import pytest

from scraper.characters import add_characters
from tests.support.env import PROJECT_ROOT
from tests.support.fake_safebooru import FakePost, FakeSafebooru
from tests.support.limits import max_in_window
from tests.support.waiting import wait_for

pytestmark = pytest.mark.processes


async def test_a_second_scraper_refuses_to_start_while_one_runs(
    fake: FakeSafebooru, service_env: dict[str, str], tmp_path
) -> None:
    tags = [f"chara_{c}" for c in "abcd"]
    for i in range(40):
        data = hashlib.sha256(f"post {i}".encode()).digest() * 8
        fake.add(FakePost(id=fake.next_id(), tags=tags[i % len(tags)], data=data, image=f"{i}.jpg"))
    add_characters(tags)
    env = {
        **os.environ,
        **service_env,
        "WAIFU_DEFAULT_SITE_URL": fake.base_url,
        "WAIFU_REQUESTS_PER_SECOND": "3",
        "WAIFU_PAGE_SIZE": "5",
        "WAIFU_BACKFILL_PAGES": "5",
        "WAIFU_POLL_INTERVAL_S": "1",
    }
    log = (tmp_path / "first.log").open("wb")
    first = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "waifu.cli", "scrape", env=env, cwd=PROJECT_ROOT, stdout=log, stderr=log
    )
    seconds = []  # killed at the end whatever happens: a scraper that failed to refuse would poll forever
    try:
        await wait_for(lambda: len(fake.api_requests()) >= 4, 60, "the first scraper to poll")
        for args in (["scrape", "--once"], ["scrape"]):
            second = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "waifu.cli",
                *args,
                env=env,
                cwd=PROJECT_ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            seconds.append(second)
            out, _ = await asyncio.wait_for(second.communicate(), 60)
            text = " ".join(out.decode(errors="replace").split())
            assert second.returncode == 3, text
            assert "another scraper is running" in text and f"pid {first.pid}" in text, text
        # the first one keeps polling, alone under the limit (50 ms of slack for arrival jitter on a busy machine;
        # a second scraper polling too would put about 6 requests in a second)
        await wait_for(lambda: len(fake.api_requests()) >= 30, 120, "the first scraper's later polls")
        assert max_in_window([r.at for r in fake.api_requests()], window=0.95) <= 3
    finally:
        for proc in seconds:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        first.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(first.wait(), 30)
        except TimeoutError:
            first.kill()  # never leave a scraper behind; the returncode check below reports it
            await first.wait()
        log.close()
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-2000:]

    # once it has stopped, the lock is free again: the next scraper starts at once
    again = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "waifu.cli",
        "scrape",
        "--once",
        env=env,
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(again.communicate(), 120)
    assert again.returncode == 0, out.decode(errors="replace")[-2000:]
