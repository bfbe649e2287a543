"""Every command of the README's command table that no other test runs, as a real `waifu` process on
ordinary inputs (SQLite and PostgreSQL). Elsewhere: worker and beat (test_worker_pools), run (test_run),
detect and predict (test_cli_images), faces label/reject/undo (test_web), retrain --wait and report
(test_retrain), scrape forever and reconcile --older-than (test_end_to_end)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlmodel import select

from db.engine import session_scope
from db.models import Character, ModelStatus, ModelVersion, Post, PostState, utcnow
from tests.support.cli import run_cli
from tests.support.drawn import drawn_image
from tests.support.env import PROJECT_ROOT, TEST_REDIS_URL
from tests.support.fake_safebooru import FakePost, FakeSafebooru

pytestmark = pytest.mark.processes
WIDE = {"COLUMNS": "250"}  # rich wraps tables at 80 columns when the output is not a terminal


def waifu(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`waifu ARGS` as a real process (for tests with no fake site to keep serving)."""
    return subprocess.run(
        [sys.executable, "-m", "waifu.cli", *args],
        env={**os.environ, **WIDE, **env},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(text: str) -> str:
    return " ".join(text.split())


def messages(redis_client, queue: str) -> list[tuple[str, list, dict]]:
    """(task name, args, kwargs) of every message waiting in `queue` (kombu JSON envelopes)."""
    out = []
    for raw in redis_client.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        out.append((envelope["headers"]["task"], args, kwargs))
    return out


def drawn_post(fake: FakeSafebooru, tags: str, seed: str, **kw) -> FakePost:
    data = drawn_image(seed)
    return fake.add(FakePost(id=fake.next_id(), tags=tags, data=data, image=f"{seed}.png", **kw))


# ------------------------------------------------------------------------------ characters ----
async def test_characters_add_list_remove_and_the_options_reach_the_site(
    fake: FakeSafebooru, service_env: dict[str, str]
) -> None:
    plain = drawn_post(fake, "1girl nishikino_maki", "plain")
    comic = drawn_post(fake, "comic nishikino_maki", "comic")
    racy = drawn_post(fake, "nishikino_maki swimsuit", "racy", rating="questionable")
    riko = drawn_post(fake, "sakurauchi_riko", "riko", rating="questionable")
    env = {**service_env, **WIDE, "WAIFU_DEFAULT_SITE_URL": fake.base_url}

    code, out, err = await run_cli(env, "characters", "add", "nishikino_maki", "sakurauchi_riko")
    assert code == 0, err
    assert "added nishikino_maki (safebooru)" in out and "added sakurauchi_riko (safebooru)" in out
    # re-adding with options updates them
    code, out, err = await run_cli(
        env, "characters", "add", "Nishikino Maki", "--extra", "-comic", "--ratings", "general,safe"
    )
    assert code == 0, err
    assert "updated nishikino_maki (safebooru)" in out and "added" not in out
    code, _, err = await run_cli(env, "characters", "add", "nishikino_maki", "--ratings", "racy")
    assert code == 2 and "rating" in err and "racy" in err

    code, out, err = await run_cli(env, "characters", "list", "--json")
    assert code == 0, err
    assert [(r["tag"], r["extra_terms"], r["ratings"], r["posts"]) for r in json.loads(out)] == [
        ("nishikino_maki", "-comic", "general,safe", 0),
        ("sakurauchi_riko", "", "", 0),
    ]

    code, out, err = await run_cli(env, "scrape", "--once")
    assert code == 0, err
    assert "scrape --once" in out and "nishikino_maki" in out and "sakurauchi_riko" in out
    maki_queries = [r.query["tags"] for r in fake.api_requests() if "nishikino_maki" in r.query["tags"]]
    assert maki_queries and all("-comic" in q.split() for q in maki_queries), maki_queries
    with session_scope() as session:
        rows = {p.remote_id: p for p in session.exec(select(Post)).all()}
    # the extra term kept the comic out of the listing; the rating filter skipped the racy post with a reason
    assert comic.id not in rows
    assert rows[plain.id].state == PostState.discovered
    assert rows[racy.id].state == PostState.skipped
    assert rows[racy.id].reason == "rating 'questionable' filtered (kept: general, safe)"
    assert rows[riko.id].state == PostState.discovered, "a character without a filter keeps every rating"

    code, out, err = await run_cli(env, "characters", "list")  # the table
    assert code == 0, err
    table = {line.split("│")[2].strip(): line for line in out.splitlines() if line.count("│") > 3}
    assert set(table) >= {"nishikino_maki", "sakurauchi_riko"}, out
    maki_cells = [c.strip() for c in table["nishikino_maki"].split("│")]
    riko_cells = [c.strip() for c in table["sakurauchi_riko"].split("│")]
    # site, tag, extra terms, ratings, posts, newest id, last poll
    assert maki_cells[1:6] == ["safebooru", "nishikino_maki", "-comic", "general,safe", "2"], maki_cells
    assert riko_cells[1:7] == ["safebooru", "sakurauchi_riko", "", "all", "1", str(riko.id)], riko_cells

    code, out, err = await run_cli(env, "characters", "remove", "nishikino_maki", "nobody_here")
    assert code == 0, err
    assert "removed nishikino_maki" in out and "not tracked: nobody_here" in out
    code, out, _ = await run_cli(env, "characters", "remove", "nobody_here")
    assert code == 1 and "not tracked: nobody_here" in out
    code, out, _ = await run_cli(env, "characters", "list", "--json")
    assert [r["tag"] for r in json.loads(out)] == ["sakurauchi_riko"]
    with session_scope() as session:
        assert session.exec(select(Character.tag)).all() == ["sakurauchi_riko"]
        assert session.exec(select(Post).where(Post.remote_id == plain.id)).one(), "posts stay"


async def test_scrape_once_exits_1_when_every_tag_fails(fake: FakeSafebooru, service_env: dict[str, str]) -> None:
    env = {**service_env, **WIDE, "WAIFU_DEFAULT_SITE_URL": fake.base_url, "WAIFU_API_RETRIES": "0"}
    drawn_post(fake, "nishikino_maki", "a")
    drawn_post(fake, "sakurauchi_riko", "b")
    assert (await run_cli(env, "characters", "add", "nishikino_maki", "sakurauchi_riko"))[0] == 0
    fake.api_faults.extend(["503"] * 2)  # one request per tag, each answered 503
    code, out, err = await run_cli(env, "scrape", "--once")
    assert code == 1, out + err
    rows = [line for line in out.splitlines() if "│" in line and "HTTP 503" in line]
    assert len(rows) == 2, out
    with session_scope() as session:
        assert session.exec(select(Post)).all() == []
    # the site answers again: the same command succeeds, nothing was lost
    code, out, err = await run_cli(env, "scrape", "--once")
    assert code == 0, out + err
    with session_scope() as session:
        assert len(session.exec(select(Post)).all()) == 2


# ------------------------------------------------------------------------------ operations ----
def make_post(
    post_id: int, state: PostState, reason: str | None = None, stored: bool = False, age: float = 0.0
) -> Post:
    return Post(
        id=post_id,
        md5=f"{post_id:032x}",
        file_url=f"https://safebooru.org//images/1/{post_id}.jpg",
        state=state,
        reason=reason,
        stored_path=f"images/00/{post_id:032x}.jpg" if stored else None,
        updated_at=utcnow() - timedelta(seconds=age),
    )


def test_status_table_retry_failed_and_reconcile(service_env: dict[str, str], redis_client) -> None:
    env = {**service_env, "WAIFU_STUCK_AFTER_S": "600"}
    with session_scope() as session:
        session.add_all(
            [
                make_post(1, PostState.done),
                make_post(2, PostState.failed, "HTTP 404 Not Found: file gone (post deleted after listing?)"),
                make_post(3, PostState.failed, "face detection failed: broken image (PNG): cut short", stored=True),
                make_post(4, PostState.discovered, age=3600),  # its message was lost an hour ago
                make_post(5, PostState.discovered, age=5),  # recent: its message may still come
            ]
        )

    status = waifu(env, "status")
    assert status.returncode == 0, status.stderr
    text = status.stdout
    assert "posts: 5" in text and "most common failure reasons" in text and "queues (messages" in text
    lines = text.split("posts: 5", 1)[1].splitlines()
    header = next(i for i, line in enumerate(lines) if "┃" in line)
    counts = next(line for line in lines[header:] if "│" in line)
    assert dict(zip(lines[header].replace("┃", " ").split(), counts.replace("│", " ").split(), strict=True)) == {
        "discovered": "2",
        "downloaded": "0",
        "detected": "0",
        "done": "1",
        "failed": "2",
        "skipped": "0",
    }
    reasons = [
        [cell.strip() for cell in line.split("│")[1:3]]
        for line in text.split("most common failure reasons", 1)[1].splitlines()
        if line.startswith("│")
    ]
    assert ["1", "HTTP N Not Found"] in reasons and ["1", "face detection failed"] in reasons, text

    retried = waifu(env, "retry-failed")
    assert retried.returncode == 0, retried.stderr
    assert "re-enqueued 2 failed post(s)" in retried.stdout
    with session_scope() as session:
        rows = {p.id: p for p in session.exec(select(Post)).all()}
    # a post whose file is stored failed at detection: it resumes there, on the cpu queue
    assert rows[3].state == PostState.downloaded and rows[3].attempts == 0
    assert rows[2].state == PostState.discovered
    assert messages(redis_client, "cpu") == [("worker.tasks.detect", [3], {})]
    assert messages(redis_client, "io") == [("worker.tasks.download", [2], {})]

    reconciled = waifu(env, "reconcile")  # default: rows unchanged for WAIFU_STUCK_AFTER_S (600 s here)
    assert reconciled.returncode == 0, reconciled.stderr
    assert "discovered: 1 re-enqueued" in reconciled.stdout and "downloaded: 0 re-enqueued" in reconciled.stdout
    assert sorted(messages(redis_client, "io")) == [
        ("worker.tasks.download", [2], {}),
        ("worker.tasks.download", [4], {}),
    ]


def test_retrain_force_enqueues_one_message_unless_one_runs(tmp_path: Path, redis_client) -> None:
    from train.retrain import retrain_lock

    env = {"WAIFU_DATA_DIR": str(tmp_path / "data"), "WAIFU_BROKER_URL": TEST_REDIS_URL}
    started = waifu(env, "retrain", "--force")
    assert started.returncode == 0, started.stderr
    [(task, args, kwargs)] = messages(redis_client, "train")
    assert (task, args, kwargs) == ("worker.tasks.retrain", [], {"force": True})
    task_id = json.loads(redis_client.lrange("train", 0, 0)[0])["headers"]["id"]
    assert f"retrain enqueued: task {task_id}" in started.stdout

    lock = retrain_lock(timeout=60)
    assert lock.acquire(blocking=False)
    try:
        busy = waifu(env, "retrain", "--force")
    finally:
        lock.release()
    assert busy.returncode == 1 and "already running" in busy.stdout
    assert redis_client.llen("train") == 1, "a running retrain must not get a second message"

    # one retrain queued at a time, whoever asked: the CLI sees the one it (or the web page) queued
    again = waifu(env, "retrain", "--force")
    assert again.returncode == 1 and f"already queued or running (task {task_id})" in again.stdout, again.stdout
    assert redis_client.llen("train") == 1

    # a worker has taken it (kombu moves it to its `unacked` hash until the ack) and has not started it yet:
    # still one retrain, not a lost one (a browser test once saw a second retrain enqueued in that window)
    redis_client.hset("unacked", "tag-1", redis_client.rpop("train"))
    taken = waifu(env, "retrain", "--force")
    assert taken.returncode == 1 and f"already queued or running (task {task_id})" in taken.stdout, taken.stdout
    assert redis_client.llen("train") == 0
    redis_client.delete("unacked")
    redis_client.delete("train")  # the broker flushed: that request is lost, a new one may be made
    after_flush = waifu(env, "retrain", "--force")
    assert after_flush.returncode == 0 and redis_client.llen("train") == 1, after_flush.stdout


def test_healthcheck_and_db_upgrade(db_url: str, tmp_path: Path, redis_client) -> None:
    """The container HEALTHCHECK (no --http) and its failure cases; `waifu db upgrade` brings a database to head."""
    from alembic.script import ScriptDirectory

    from db.migrate import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    before_head = script.get_revision(head).down_revision
    env = {"WAIFU_DATA_DIR": str(tmp_path / "data"), "WAIFU_DATABASE_URL": db_url, "WAIFU_BROKER_URL": TEST_REDIS_URL}

    behind = waifu(env, "db", "upgrade", before_head)  # a database one migration behind the code
    assert behind.returncode == 0, behind.stderr
    assert f"database at revision {before_head}" in one_line(behind.stdout)
    check = waifu(env, "healthcheck")
    assert check.returncode == 1 and f"database not at migration head {head}" in one_line(check.stderr)

    upgraded = waifu(env, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"database at revision {head}" in one_line(upgraded.stdout)
    check = waifu(env, "healthcheck")
    assert check.returncode == 0 and check.stdout.strip() == "healthy", check.stderr

    down = waifu({**env, "WAIFU_BROKER_URL": "redis://127.0.0.1:1/0"}, "healthcheck")
    assert down.returncode == 1
    assert "broker unreachable at redis://127.0.0.1:1/0" in one_line(down.stderr)
    assert "database" not in down.stderr, "only the broker is at fault"


# -------------------------------------------------------------------------------- web page ----
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_web_serves_the_collection_and_stops_on_sigterm(service_env: dict[str, str], tmp_path: Path) -> None:
    from scraper.characters import add_characters

    add_characters(["nishikino_maki"])
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAIFU_WEB_")} | service_env
    log_path = tmp_path / "web.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "waifu.cli",
            "web",
            "--port",
            str(port),
            env=env,
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", follow_redirects=True) as client:
                while True:
                    assert proc.returncode is None, log_path.read_text()[-2000:]
                    assert time.monotonic() < deadline, "waifu web did not answer: " + log_path.read_text()[-2000:]
                    try:
                        page = await client.get("/collection", timeout=5)
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.3)
                faces = await client.get("/faces", timeout=10)
            assert page.status_code == 200 and "nishikino_maki" in page.text
            assert faces.status_code == 200
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
    output = log_path.read_text(errors="replace")
    assert proc.returncode == 0, output[-2000:]
    assert "Traceback" not in output


def test_status_names_the_current_model_and_a_later_candidate(service_env: dict[str, str]) -> None:
    """A person sees which model predictions use, and why the latest retrain did not replace it."""
    none_yet = waifu(service_env, "status")
    assert none_yet.returncode == 0, none_yet.stderr
    assert "model: none yet" in none_yet.stdout and "waifu retrain" in none_yet.stdout
    with session_scope() as session:
        session.add(ModelVersion(status=ModelStatus.current, accuracy=0.8412, macro_f1=0.8, loop_round=1))
        session.add(ModelVersion(status=ModelStatus.candidate, accuracy=0.81, reason="0.810 < 0.841 on today's split"))
    text = " ".join(waifu(service_env, "status").stdout.split())
    assert "model: v1 current (accuracy 0.841, macro-F1 0.800, loop round 1" in text, text
    assert "latest retrain: v2 candidate: 0.810 < 0.841 on today's split" in text, text
    data = json.loads(waifu(service_env, "status", "--json").stdout)
    assert data["model"]["current"]["version"] == 1 and data["model"]["latest"]["status"] == "candidate"
