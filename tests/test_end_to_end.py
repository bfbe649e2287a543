"""The whole collection path with real parts: CLI processes, fake safebooru over HTTP, real Redis broker,
a real Celery worker process, and the database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlmodel import select

from db.engine import session_scope
from db.models import Character, Face, FaceState, LabelSource, Post, PostCharacter, PostState
from tests.support.cli import run_cli
from tests.support.env import PROJECT_ROOT
from tests.support.fake_safebooru import FakePost, FakeSafebooru, load_drawn, load_illustrations
from tests.support.waiting import wait_for

pytestmark = pytest.mark.processes
TAGS = ["nishikino_maki", "sakurauchi_riko", "takimoto_hifumi"]


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
            select(Post.remote_id, Character.tag)
            .join(PostCharacter, PostCharacter.post_id == Post.id)
            .join(Character, Character.id == PostCharacter.character_id)
        ).all()
    links: dict[int, set[str]] = {}
    for post_id, tag in rows:
        links.setdefault(post_id, set()).add(tag)
    return links


async def test_full_run_downloads_every_image_once(
    fake: FakeSafebooru, service_env: dict[str, str], start_worker
) -> None:
    posts = load_illustrations(fake)  # real illustrations: the face counts below need real faces
    tags = sorted({p.tags.split()[1] for p in posts})
    # one illustration shows two tracked characters: one row, two links
    both = posts[0]
    both.tags = f"{both.tags} {tags[-1] if tags[-1] not in both.tags else tags[0]}"
    # and two bad ones, which must not disturb the others
    bad_md5 = fake.add(
        FakePost(
            id=fake.next_id(),
            tags=f"1girl {tags[0]}",
            data=posts[1].data + b"x",
            image="badmd5.jpg",
            fault="md5_mismatch",
        )
    )
    gone = fake.add(
        FakePost(id=fake.next_id(), tags=f"1girl {tags[1]}", data=posts[2].data + b"y", image="gone.jpg", fault="404")
    )
    env = {**service_env, "WAIFU_DEFAULT_SITE_URL": fake.base_url, "WAIFU_BACKFILL_PAGES": "10"}

    code, out, err = await run_cli(env, "characters", "add", *tags)
    assert code == 0, err
    code, out, err = await run_cli(env, "scrape", "--once")
    assert code == 0, err

    start_worker(extra_env={"WAIFU_DEFAULT_SITE_URL": fake.base_url})
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
    # labels: a face labelled by tag carries the one tracked character of its own post, for every character
    with session_scope() as session:
        labelled = session.exec(
            select(Post.remote_id, Face.label)
            .join(Face, Face.post_id == Post.id)
            .where(Face.label_source == LabelSource.tag)
        ).all()
    wrong = [(remote_id, label) for remote_id, label in labelled if links[remote_id] != {label}]
    assert wrong == [], "faces labelled with another post's character"
    assert set(faces["per_character"]) == set(tags)
    for tag in tags:
        single = sum(1 for fp in posts if originals[fp.md5] == fp.id and links[fp.id] == {tag})
        counted = sum(faces["per_character"][tag].values())  # train + test
        assert counted == sum(label == tag for _, label in labelled)
        assert counted >= single * 0.7, f"{tag}: {counted} faces labelled of {single} single-character posts"


async def test_lost_messages_are_reconciled(
    fake: FakeSafebooru, service_env: dict[str, str], start_worker, redis_client
) -> None:
    posts = load_drawn(fake, dict.fromkeys(TAGS, 4))  # no face needed: drawn pictures end done with 0 faces
    tags = sorted({p.tags.split()[1] for p in posts})
    env = {**service_env, "WAIFU_DEFAULT_SITE_URL": fake.base_url}
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

    start_worker(extra_env={"WAIFU_DEFAULT_SITE_URL": fake.base_url})
    await wait_for(all_settled(len(posts)), 240, "reconciled posts to be processed")
    assert posts_by_state() == {PostState.done: len(posts)}
    assert all(fake.file_hits[p.id] == 1 for p in posts)


async def test_messages_lost_after_download_and_mid_crop_are_reconciled(
    fake: FakeSafebooru, service_env: dict[str, str], start_worker, redis_client
) -> None:
    """Rows waiting at every step lose their message (Redis flushed): `waifu reconcile` brings back the
    detections, the crops, and a post none of whose faces waits any more (rejected by hand before its crop)."""
    from core.settings import get_settings
    from detect.step import detect_post

    posts = load_illustrations(fake, limit_per_tag=2)  # real faces: the crop step needs them
    tags = sorted({p.tags.split()[1] for p in posts})
    env = {**service_env, "WAIFU_DEFAULT_SITE_URL": fake.base_url}
    assert (await run_cli(env, "characters", "add", *tags))[0] == 0
    assert (await run_cli(env, "scrape", "--once"))[0] == 0
    start_worker(queues="io", extra_env={"WAIFU_DEFAULT_SITE_URL": fake.base_url})  # downloads only
    await wait_for(lambda: posts_by_state() == {PostState.downloaded: len(posts)}, 180, "every post downloaded")
    redis_client.flushdb()  # the detect messages are lost

    with session_scope() as session:
        ids = sorted(session.exec(select(Post.id)).all())
    # the detection of all but two posts ran, and the crop messages it would hand on are lost too
    for post_id in ids[2:]:
        await asyncio.to_thread(detect_post, post_id, get_settings())
    with session_scope() as session:
        faces = {
            post_id: [f.id for f in session.exec(select(Face).where(Face.post_id == post_id)).all()]
            for post_id in ids[2:]
        }
    emptied = next(post_id for post_id in ids[2:] if faces[post_id])
    for face_id in faces[emptied]:  # a person rejects every face of one post before it is cropped
        assert (await run_cli(env, "faces", "reject", str(face_id)))[0] == 0
    waiting = sum(len(f) for post_id, f in faces.items() if post_id != emptied)
    assert waiting > 0

    code, out, err = await run_cli(env, "reconcile", "--older-than", "0")
    assert code == 0, err
    out = " ".join(out.split())  # the console wraps long lines at the terminal's width
    assert "downloaded: 2 re-enqueued" in out and f"face detected: {waiting} re-enqueued" in out, out
    assert "completed: 1" in out, out
    assert redis_client.llen("cpu") == 2 + waiting

    start_worker(queues="cpu", extra_env={"WAIFU_DEFAULT_SITE_URL": fake.base_url})
    await wait_for(lambda: posts_by_state() == {PostState.done: len(posts)}, 240, "every post done")
    with session_scope() as session:
        states = {f.id: f.state for f in session.exec(select(Face)).all()}
    assert {states[f] for f in faces[emptied]} == {FaceState.rejected}
    assert all(state == FaceState.ready for face_id, state in states.items() if face_id not in faces[emptied])
    code, out, _ = await run_cli(env, "reconcile", "--older-than", "0")
    out = " ".join(out.split())
    assert "downloaded: 0 re-enqueued" in out and "face detected: 0 re-enqueued" in out and "completed: 0" in out


async def test_busy_and_rate_limited_files_are_retried_by_the_task_after_their_wait(
    fake: FakeSafebooru, service_env: dict[str, str], start_worker
) -> None:
    """Transient download faults go through Celery's retry with the step's countdown: the backoff for a 503,
    the server's Retry-After for a 429; then the post is stored."""
    posts = load_drawn(fake, {"nishikino_maki": 2, "sakurauchi_riko": 2})
    busy, limited = posts[0], posts[1]
    busy.fault, limited.fault = "503_once", "429_once"
    fake.retry_after = "2"
    env = {**service_env, "WAIFU_DEFAULT_SITE_URL": fake.base_url, "WAIFU_DOWNLOAD_BACKOFF_S": "1"}
    assert (await run_cli(env, "characters", "add", "nishikino_maki", "sakurauchi_riko"))[0] == 0
    assert (await run_cli(env, "scrape", "--once"))[0] == 0
    start_worker(extra_env={"WAIFU_DEFAULT_SITE_URL": fake.base_url, "WAIFU_DOWNLOAD_BACKOFF_S": "1"})
    await wait_for(all_settled(len(posts)), 120, "every post to reach a terminal state")
    assert posts_by_state() == {PostState.done: len(posts)}
    assert {p.id: fake.file_hits[p.id] for p in posts} == {p.id: 2 if p in (busy, limited) else 1 for p in posts}

    def gap(post: FakePost) -> float:
        first, second = [r.at for r in fake.file_requests() if r.path.endswith(f"/{post.image}")]
        return second - first

    # first backoff: WAIFU_DOWNLOAD_BACKOFF_S x 0.8..1.2; a 429 waits what the server asked for
    assert gap(busy) >= 0.8, f"the 503 was retried after {gap(busy):.2f} s"
    assert gap(limited) >= 1.95, f"the 429 was retried after {gap(limited):.2f} s, not after Retry-After: 2"
    with session_scope() as session:
        rows = {p.remote_id: p for p in session.exec(select(Post)).all()}
    assert rows[busy.id].attempts == 2 and rows[limited.id].attempts == 2
    # the retry's reason is gone: what is left is the end of the pipeline (drawn pictures hold no anime face)
    assert rows[busy.id].reason == rows[limited.id].reason == "no face found"


async def test_scrape_polls_until_sigterm_and_stops_cleanly(
    fake: FakeSafebooru, service_env: dict[str, str], tmp_path: Path
) -> None:
    import signal

    posts = load_drawn(fake, dict.fromkeys(TAGS, 2))
    tags = sorted({p.tags.split()[1] for p in posts})
    env = {**service_env, "WAIFU_DEFAULT_SITE_URL": fake.base_url, "WAIFU_POLL_INTERVAL_S": "0.5"}
    assert (await run_cli(env, "characters", "add", *tags))[0] == 0
    log_path = tmp_path / "scrape.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "waifu.cli",
            "scrape",
            env={**os.environ, **env},
            cwd=PROJECT_ROOT,
            stdout=log_file,
            stderr=log_file,
        )
        # it keeps polling: after the first pass, idle polls go on at the interval (one request per tag)
        await wait_for(lambda: len(fake.api_requests()) >= 3 * len(tags), 60, "several polls")
        assert len(character_links()) == len(posts)
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
    log = log_path.read_text()
    assert proc.returncode == 0, log[-2000:]
    assert "scraper stopped" in log and "Traceback" not in log
