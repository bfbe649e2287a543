"""What `waifu run`'s screen is made of: the status it reads (latest failures, next poll, no write lock) and
how it shows it (live screen, plain line, rates). The screen in a real terminal is tests/test_run.py's."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console
from sqlmodel import select

from core.settings import get_settings, reset_settings_cache
from db.engine import session_scope
from db.models import Character, Post, PostCharacter, PostState, ScrapeCursor, utcnow
from scraper.characters import add_characters
from waifu.live import RateMeter, RunView, Snapshot, plain_line, render_screen
from waifu.status import collect_status


def post(post_id: int, state: PostState, reason: str | None = None, age: float = 0.0) -> Post:
    return Post(
        id=post_id,
        md5=f"{post_id:032x}",
        file_url=f"https://safebooru.org//images/1/{post_id}.jpg",
        state=state,
        reason=reason,
        updated_at=utcnow() - timedelta(seconds=age),
    )


def test_status_groups_the_latest_failures_and_knows_the_next_poll(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WAIFU_POLL_INTERVAL_S", "300")
    reset_settings_cache()
    add_characters(["nishikino_maki", "sakurauchi_riko"])
    polled = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    with session_scope() as session:
        session.add_all(
            [
                post(1, PostState.done),
                post(2, PostState.failed, "HTTP 404 Not Found: file gone", age=600),
                post(3, PostState.failed, "md5 mismatch: API announced aaaa, file is bbbb", age=60),
                post(4, PostState.failed, "md5 mismatch: API announced cccc, file is dddd", age=30),
                ScrapeCursor(tag="nishikino_maki", last_poll_at=polled - timedelta(seconds=20)),
                ScrapeCursor(tag="sakurauchi_riko", last_poll_at=polled),  # the pass ended with this tag
            ]
        )
        session.flush()
        maki = session.exec(select(Character).where(Character.tag == "nishikino_maki")).one()
        session.add(PostCharacter(post_id=1, character_id=maki.id))

    status = collect_status(get_settings())
    assert [(f["kind"], f["reason"], f["count"]) for f in status["recent_failures"]] == [
        ("post", "md5 mismatch", 2),
        ("post", "HTTP N Not Found", 1),
    ]  # newest group first
    assert status["recent_failures"][0]["example"].startswith("md5 mismatch: API announced cccc")
    assert datetime.fromisoformat(status["next_poll_at"]) == polled + timedelta(seconds=300)
    # the keys `waifu status --json` always had are still there
    assert {"posts", "total", "characters", "failure_reasons", "faces", "queues", "cursors"} <= set(status)


def test_status_reads_while_a_writer_holds_the_sqlite_lock(service_env: dict[str, str], db_url: str) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite's single write lock is what this is about")
    with session_scope() as session:
        session.add(post(1, PostState.done))
    writer = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a worker in the middle of a write transaction
    try:
        started = time.monotonic()
        status = collect_status(get_settings())
        assert time.monotonic() - started < 1.0, "the screen waited for the write lock"
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert status["posts"]["done"] == 1


def test_rates_per_minute_come_from_the_counts_between_redraws() -> None:
    meter = RateMeter(window=60)
    assert meter.add(0.0, {"done": 0}) == {"done": None}  # one sample: no rate yet
    assert meter.add(30.0, {"done": 10}) == {"done": 20.0}
    assert meter.add(60.0, {"done": 30}) == {"done": 30.0}
    # older samples leave the window: the rate follows the recent pace
    assert meter.add(120.0, {"done": 30}) == {"done": 0.0}


def snapshot(**changes) -> Snapshot:
    data = {
        "posts": {"discovered": 2, "downloaded": 1, "detected": 0, "done": 40, "failed": 3, "skipped": 1},
        "total": 47,
        "characters": {"nishikino_maki": {"done": 25, "failed": 3}, "sakurauchi_riko": {"done": 15, "discovered": 2}},
        "faces": {
            "states": {"detected": 1, "ready": 33, "rejected": 0, "failed": 0},
            "label_sources": {"tag": 30, "ambiguous": 3},
            "per_character": {"nishikino_maki": {"train": 17, "test": 3}},
        },
        "queues": {"io": 2, "cpu": 1, "train": 0},
        "recent_failures": [
            {
                "kind": "post",
                "reason": "HTTP N Not Found",
                "count": 3,
                "example": "HTTP 404",
                "last_at": "2030-01-02T03:03:05+00:00",
            }
        ],
        "next_poll_at": "2030-01-02T03:09:05+00:00",
    }
    values = dict(
        data=data,
        error=None,
        rates={"done": 12.0, "ready": 9.5},
        children=[("worker-io", "running"), ("worker-cpu", "exited 1")],
        log_path=Path("/srv/d/logs/run.log"),
        now=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
        uptime=125.0,
        broker="embedded redis://x:1/0",
    )
    values.update(changes)
    return Snapshot(**values)


def test_the_screen_shows_states_characters_failures_children_and_the_log() -> None:
    console = Console(record=True, width=160, color_system=None)
    console.print(render_screen(snapshot()))
    text = console.export_text()
    assert "/srv/d/logs/run.log" in text and "up 2m05s" in text
    assert "posts 47" in text and "done 40" in text and "failed 3" in text and "12.0 done/min" in text
    assert "ready 33" in text and "tag 30" in text and "ambiguous 3" in text and "9.5 ready/min" in text
    assert "io 2" in text and "cpu 1" in text
    assert "(in 5m00s)" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip().startswith("nishi")}
    assert rows["nishikino_maki"] == ["0", "0", "0", "25", "3", "0", "17/3"]
    assert "HTTP N Not Found" in text and "1m00s ago" in text
    assert "worker-io running" in text and "worker-cpu exited 1" in text


def test_without_characters_the_screen_says_how_to_add_them() -> None:
    snap = snapshot()
    snap.data["characters"] = {}
    assert "make run CHARACTERS=" in plain_line(snap)


def test_the_plain_line_holds_the_same_summary() -> None:
    line = plain_line(snapshot())
    assert "\n" not in line
    assert "posts 47 (discovered 2 downloaded 1 detected 0 done 40 failed 3 skipped 1) 12.0 done/min" in line
    assert "faces ready 33 (ambiguous 3 tag 30) 9.5 ready/min" in line
    assert "queues io 2 cpu 1 train 0" in line and "nishikino_maki 25/28" in line
    assert "failures 3x HTTP N Not Found" in line and "children 1/2 running" in line


def test_a_database_it_cannot_read_is_shown_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAIFU_DATABASE_URL", f"sqlite:///{tmp_path / 'missing' / 'no-tables.db'}")
    monkeypatch.setenv("WAIFU_DATA_DIR", str(tmp_path))
    reset_settings_cache()
    try:
        console = Console(file=(tmp_path / "out.txt").open("w"), width=200)
        assert not console.is_terminal
        with RunView(get_settings(), console, tmp_path / "run.log", []) as view:
            view.tick()
        console.file.close()
    finally:
        reset_settings_cache()
    lines = (tmp_path / "out.txt").read_text().splitlines()
    assert len(lines) == 2  # the first tick, then the final one at the end
    assert all("status unavailable: OperationalError" in line for line in lines), lines
