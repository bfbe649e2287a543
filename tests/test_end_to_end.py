"""The whole collection path with real parts: CLI processes, fake safebooru over HTTP, real Redis broker,
a real Celery worker process, and the database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlmodel import select

from db.engine import session_scope
from db.models import Character, Post, PostCharacter, PostState
from tests.conftest import PROJECT_ROOT
from tests.fake_safebooru import FakePost, FakeSafebooru, load_drawn, load_illustrations

pytestmark = pytest.mark.slow
TAGS = ["nishikino_maki", "sakurauchi_riko", "takimoto_hifumi"]


async def run_cli(env: dict[str, str], *args: str, timeout: float = 300) -> tuple[int, str, str]:
    """Runs `waifu ARGS` as a real process without blocking the fake's event loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "waifu.cli", *args, env={**os.environ, **env}, cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.5)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def posts_by_state() -> dict[str, int]:
    with session_scope() as session:
        counts: dict[str, int] = {}
        for post in session.exec(select(Post)).all():
            counts[post.state] = counts.get(post.state, 0) + 1
        return counts


PENDING = (PostState.discovered, PostState.downloaded, PostState.detected)


def all_settled(expected: int) -> Callable[[], bool]:
    """True once `expected` posts exist and every one is in a terminal state (done, failed, skipped)."""
    def check() -> bool:
        counts = posts_by_state()
        return sum(counts.values()) == expected and not any(counts.get(s, 0) for s in PENDING)
    return check


def character_links() -> dict[int, set[str]]:
    """Tracked tags per post, by the site's own post id (the fake's ids)."""
    with session_scope() as session:
        rows = session.exec(
            select(Post.remote_id, Character.tag).join(PostCharacter, PostCharacter.post_id == Post.id)
            .join(Character, Character.id == PostCharacter.character_id)
        ).all()
    links: dict[int, set[str]] = {}
    for post_id, tag in rows:
        links.setdefault(post_id, set()).add(tag)
    return links


async def test_full_run_downloads_every_image_once(fake: FakeSafebooru, service_env: dict[str, str],
                                                   start_worker) -> None:
    posts = load_illustrations(fake)  # real illustrations: the face counts below need real faces
    tags = sorted({p.tags.split()[1] for p in posts})
    # one illustration shows two tracked characters: one row, two links
    both = posts[0]
    both.tags = f"{both.tags} {tags[-1] if tags[-1] not in both.tags else tags[0]}"
    # and two bad ones, which must not disturb the others
    bad_md5 = fake.add(FakePost(id=fake.next_id(), tags=f"1girl {tags[0]}", data=posts[1].data + b"x",
                                image="badmd5.jpg", fault="md5_mismatch"))
    gone = fake.add(FakePost(id=fake.next_id(), tags=f"1girl {tags[1]}", data=posts[2].data + b"y",
                             image="gone.jpg", fault="404"))
    env = {**service_env, "WAIFU_SAFEBOORU_URL": fake.base_url, "WAIFU_BACKFILL_PAGES": "10"}

    code, out, err = await run_cli(env, "characters", "add", *tags)
    assert code == 0, err
    code, out, err = await run_cli(env, "scrape", "--once")
    assert code == 0, err

    start_worker(extra_env={"WAIFU_SAFEBOORU_URL": fake.base_url})
    total = len(posts) + 2
    await wait_for(all_settled(total), 400, "every post to reach a terminal state")

    settings_data = Path(service_env["WAIFU_DATA_DIR"])
    links = character_links()
    with session_scope() as session:
        rows = {p.remote_id: p for p in session.exec(select(Post)).all()}
    originals: dict[str, int] = {}
    for fp in posts:
        originals.setdefault(fp.md5, fp.id)
    for fp in posts:
        row = rows[fp.id]
        expected_tags = {t for t in fp.tags.split() if t in tags}
        assert links[fp.id] == expected_tags
        if originals[fp.md5] != fp.id:  # the set holds one real repost (takimoto_hifumi 3.jpg = 11.jpg)
            assert row.state == PostState.skipped and row.duplicate_of == rows[originals[fp.md5]].id
            assert fake.file_hits.get(fp.id, 0) == 0
            continue
        assert row.state == PostState.done, (fp.id, row.state, row.reason)
        stored = settings_data / row.stored_path
        assert stored.stem == fp.md5, "files are named by content hash, not by the remote name"
        assert hashlib.md5(stored.read_bytes()).hexdigest() == fp.md5
        assert fake.file_hits[fp.id] == 1, f"post {fp.id} downloaded {fake.file_hits[fp.id]} times"
    assert len(links[both.id]) == 2
    assert rows[bad_md5.id].state == PostState.failed and "md5" in rows[bad_md5.id].reason
    assert rows[gone.id].state == PostState.failed and "404" in rows[gone.id].reason

    code, out, err = await run_cli(env, "status", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["posts"]["done"] == len(originals) == len(posts) - 1
    assert status["posts"]["skipped"] == 1
    assert status["posts"]["failed"] == 2
    assert {r["count"] for r in status["failure_reasons"]} == {1}
    assert set(status["characters"]) == set(tags)
    assert status["queues"]["io"] == 0 and status["queues"]["cpu"] == 0
    # the face pipeline ran behind the downloads: faces are cropped, labelled and split
    faces = status["faces"]
    assert faces["states"]["ready"] >= len(originals) * 0.9
    assert faces["states"]["detected"] == 0
    assert faces["label_sources"]["tag"] >= len(originals) * 0.7
    assert faces["posts_without_face"] <= len(originals) * 0.05
    assert set(faces["per_character"]) <= set(tags)


async def test_lost_messages_are_reconciled(fake: FakeSafebooru, service_env: dict[str, str], start_worker,
                                            redis_client) -> None:
    posts = load_drawn(fake, dict.fromkeys(TAGS, 4))  # no face needed: drawn pictures end done with 0 faces
    tags = sorted({p.tags.split()[1] for p in posts})
    env = {**service_env, "WAIFU_SAFEBOORU_URL": fake.base_url}
    assert (await run_cli(env, "characters", "add", *tags))[0] == 0
    code, _, err = await run_cli(env, "scrape", "--once")
    assert code == 0, err
    assert redis_client.llen("io") == len(posts)

    redis_client.flushdb()  # Redis restarted without persistence: every message (and marker) is gone
    code, out, err = await run_cli(env, "reconcile", "--older-than", "0")
    assert code == 0, err
    assert f"discovered: {len(posts)} re-enqueued" in out

    # a second reconcile while the messages are queued must not duplicate them
    code, out, _ = await run_cli(env, "reconcile", "--older-than", "0")
    assert "discovered: 0 re-enqueued" in out
    assert redis_client.llen("io") == len(posts)

    start_worker(extra_env={"WAIFU_SAFEBOORU_URL": fake.base_url})
    await wait_for(all_settled(len(posts)), 240, "reconciled posts to be processed")
    assert posts_by_state() == {PostState.done: len(posts)}
    assert all(fake.file_hits[p.id] == 1 for p in posts)


async def test_scrape_polls_until_sigterm_and_stops_cleanly(fake: FakeSafebooru, service_env: dict[str, str],
                                                            tmp_path: Path) -> None:
    import signal

    posts = load_drawn(fake, dict.fromkeys(TAGS, 2))
    tags = sorted({p.tags.split()[1] for p in posts})
    env = {**service_env, "WAIFU_SAFEBOORU_URL": fake.base_url, "WAIFU_POLL_INTERVAL": "0.5"}
    assert (await run_cli(env, "characters", "add", *tags))[0] == 0
    log_path = tmp_path / "scrape.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "waifu.cli", "scrape", env={**os.environ, **env}, cwd=PROJECT_ROOT,
            stdout=log_file, stderr=log_file,
        )
        # it keeps polling: after the first pass, idle polls go on at the interval (one request per tag)
        await wait_for(lambda: len(fake.api_requests()) >= 3 * len(tags), 60, "several polls")
        assert len(character_links()) == len(posts)
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
    log = log_path.read_text()
    assert proc.returncode == 0, log[-2000:]
    assert "scraper stopped" in log and "Traceback" not in log
