"""A step that hands no row on while rows wait for it shows as stalled in `waifu status`, `waifu run`'s
summary and the web collection page, and fails the healthcheck of its worker (waifu.stalls). A step that
moves slowly is not stalled, and neither is one with nothing waiting."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from rich.console import Console

from core.settings import get_settings, reset_settings_cache
from db.engine import session_scope
from db.models import Face, FaceState, Post, PostState, utcnow
from tests.support.cli import run_cli_blocking
from tests.support.web import Web
from waifu.live import RunView, render_screen
from waifu.stalls import find_stalls
from waifu.web.server import serving_in_thread

STALL_AFTER = 600  # 10 minutes
DETECT_STALL = "detect (cpu queue): no progress for 20 min while 37 posts wait"


def post(post_id: int, state: PostState, minutes_ago: float, attempts: int = 1, stored: bool = True) -> Post:
    return Post(
        id=post_id,
        md5=f"{post_id:032x}",
        file_url=f"https://safebooru.org//images/1/{post_id}.jpg",
        state=state,
        attempts=attempts,
        stored_path=f"images/{post_id}.png" if stored else None,
        updated_at=utcnow() - timedelta(minutes=minutes_ago),
    )


def face(face_id: int, post_id: int, state: FaceState, minutes_ago: float) -> Face:
    return Face(
        id=face_id,
        post_id=post_id,
        detector="animeface",
        x=0,
        y=0,
        w=10,
        h=10,
        crop_left=0,
        crop_top=0,
        crop_right=10,
        crop_bottom=10,
        state=state,
        updated_at=utcnow() - timedelta(minutes=minutes_ago),
    )


@pytest.fixture
def pipeline(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """- detect is stalled: 37 posts downloaded 20.5 minutes ago, its last post detected 30 minutes ago;
    - download is slow, not stalled: 5 posts waiting for 40 minutes, the last one stored 2 minutes ago
      (it waits for detect too, and so is one of the 37);
    - crop has nothing waiting: its last face was made an hour ago.
    """
    monkeypatch.setenv("WAIFU_STALL_AFTER_S", str(STALL_AFTER))
    reset_settings_cache()
    rows = [post(i, PostState.downloaded, 20.5) for i in range(1, 37)]
    rows += [post(100, PostState.detected, 30), post(101, PostState.done, 60)]
    rows += [post(i, PostState.discovered, 40, attempts=0, stored=False) for i in range(200, 205)]
    rows += [post(205, PostState.downloaded, 2)]
    with session_scope() as session:
        session.add_all(rows)
        session.flush()
        session.add(face(1, 101, FaceState.ready, 60))
    return {**service_env, "WAIFU_STALL_AFTER_S": str(STALL_AFTER)}


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_status_names_the_stalled_step_not_the_slow_one(pipeline: dict[str, str]) -> None:
    shown = run_cli_blocking(pipeline, "status", columns=200)
    assert shown.returncode == 0, shown.stderr
    text = one_line(shown.stdout)
    assert f"STALLED {DETECT_STALL}" in text
    assert "download (io queue)" not in text and "crop (cpu queue)" not in text

    import json

    as_json = run_cli_blocking(pipeline, "status", "--json")
    stalls = json.loads(as_json.stdout)["stalls"]
    assert [(s["step"], s["queue"], s["waiting"], s["text"]) for s in stalls] == [("detect", "cpu", 37, DETECT_STALL)]


def test_healthcheck_fails_only_for_the_stalled_queue(pipeline: dict[str, str]) -> None:
    cpu = run_cli_blocking(pipeline, "healthcheck", "--queues", "cpu")
    assert cpu.returncode == 1
    assert cpu.stderr.strip() == f"unhealthy: {DETECT_STALL}", cpu.stderr
    assert len(cpu.stderr.strip().splitlines()) == 1

    for healthy in (("--queues", "io"), ()):  # the io worker is slow, not stalled; without --queues: no stall check
        answer = run_cli_blocking(pipeline, "healthcheck", *healthy)
        assert answer.returncode == 0 and answer.stdout.strip() == "healthy", (healthy, answer.stderr)

    typo = run_cli_blocking(pipeline, "healthcheck", "--queues", "cpux")
    assert typo.returncode == 1 and "unknown queue cpux (known: io, cpu, train)" in typo.stderr

    with session_scope() as session:  # one post detected now: detect progresses again
        row = session.get(Post, 1)
        row.state, row.updated_at = PostState.detected, utcnow()
    again = run_cli_blocking(pipeline, "healthcheck", "--queues", "io,cpu")
    assert again.returncode == 0 and again.stdout.strip() == "healthy", again.stderr


def test_nothing_waiting_is_not_a_stall(service_env: dict[str, str]) -> None:
    with session_scope() as session:
        session.add_all([post(1, PostState.done, 300), post(2, PostState.failed, 300, stored=False)])
        session.add_all([post(3, PostState.skipped, 300, attempts=0, stored=False)])
        session.flush()
        session.add(face(1, 1, FaceState.ready, 300))
    env = {**service_env, "WAIFU_STALL_AFTER_S": str(STALL_AFTER)}
    check = run_cli_blocking(env, "healthcheck", "--queues", "io,cpu")
    assert check.returncode == 0 and check.stdout.strip() == "healthy", check.stderr
    assert "STALLED" not in run_cli_blocking(env, "status", columns=200).stdout

    # work arriving after a quiet hour: the clock starts with it, not with the last progress
    with session_scope() as session:
        session.add(post(4, PostState.downloaded, 1))
    check = run_cli_blocking(env, "healthcheck", "--queues", "cpu")
    assert check.returncode == 0, check.stderr


def test_crop_stalls_and_the_scrapers_own_skips_are_no_download_progress(
    service_env: dict[str, str],
) -> None:
    """Crop waits on faces; a post the scraper skipped (no attempt) is not the download step's work."""
    with session_scope() as session:
        session.add_all([post(1, PostState.detected, 50), post(2, PostState.discovered, 45, attempts=0, stored=False)])
        session.add(post(3, PostState.skipped, 1, attempts=0, stored=False))  # filtered rating, at listing
        session.flush()
        session.add_all([face(1, 1, FaceState.detected, 50), face(2, 1, FaceState.detected, 49)])
    now = utcnow()
    found = {s.step: s.sentence(now) for s in find_stalls(STALL_AFTER, now=now)}
    assert found == {
        "crop": "crop (cpu queue): no progress for 50 min while 2 faces wait",
        "download": "download (io queue): no progress for 45 min while 1 post waits",
    }
    assert [s.step for s in find_stalls(STALL_AFTER, ["io"], now=now)] == ["download"]


def test_run_summary_shows_the_stall(pipeline: dict[str, str], tmp_path: Path) -> None:
    plain = Console(record=True, width=400, color_system=None, force_terminal=False)
    with RunView(get_settings(), plain, tmp_path / "run.log", children=[]) as view:
        view.tick()
    line = plain.export_text()
    assert f"STALLED {DETECT_STALL}" in line
    assert "download (io queue)" not in line

    screen = Console(record=True, width=160, color_system=None)
    screen.print(render_screen(view.last))
    assert f"STALLED {DETECT_STALL}" in one_line(screen.export_text())


@pytest.fixture
def web(pipeline: dict[str, str], redis_client) -> Iterator[Web]:
    with serving_in_thread(get_settings()) as base:
        client = Web(base)
        yield client
        client.client.close()


def test_collection_page_shows_the_stall(web: Web) -> None:
    page = web.get("/collection")
    assert page.status_code == 200
    assert f'<li class="stall error">{DETECT_STALL}</li>' in page.text
    assert "download (io queue)" not in page.text
