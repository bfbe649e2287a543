"""The soak harness (bench/soak.py) itself: a short real run with a small chaos schedule whose accounting is
checked against the database it leaves, and the log reading it bases "errors swallowed" on."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.soak_report import Observer
from tests.support.env import PROJECT_ROOT
from tests.support.testdata import raw_images

pytestmark = pytest.mark.processes


def rows_of(db: Path) -> dict[int, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("select remote_id, state from post where remote_id is not null").fetchall())


def test_short_soak_counts_what_the_database_holds_and_a_withheld_post_as_lost(tmp_path) -> None:
    raw_images()  # the real test images, or the one line saying how to provide them
    work = tmp_path / "soak"
    argv = [sys.executable, "-m", "bench.soak", "--minutes", "1", "--db", "sqlite", "--workdir", str(work)]
    argv += ["--kill-every", "20", "--publish-every", "6", "--initial-posts", "6", "--big-png", "0"]
    argv += ["--lost-after", "30", "--withhold-one"]
    done = subprocess.run(argv, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), done.stdout + done.stderr  # 1: a verdict failed, the harness worked

    report = json.loads((work / "soak-report.json").read_text())
    markdown = (work / "soak-report.md").read_text()
    assert report["final"] is True and "Verdict" in markdown
    ledger_withheld = [c for c in report["chaos"] if c["name"] == "withheld"]
    withheld_id = int(ledger_withheld[0]["detail"].split()[1])

    rows = rows_of(work / "data" / "waifu.db")
    lost_ids = {p["post"] for p in report["lost"]}
    # the withheld post was never listed: no row, reported lost; any other lost post really has no row
    assert withheld_id not in rows and withheld_id in lost_ids
    assert not lost_ids & set(rows)
    # every listed post that has a row is counted, and so are its terminal states
    published_rows = {rid: state for rid, state in rows.items() if rid != withheld_id}
    assert report["rows"]["of_published"] == len(published_rows)
    terminal = sum(state in ("done", "failed", "skipped") for state in published_rows.values())
    assert report["rows"]["terminal"] == terminal
    assert sum(report["rows"]["by_state"].values()) == len(published_rows)
    # the unusable entry of the first burst is counted apart, not as usable
    assert report["published"]["unusable"] >= 1
    assert report["published"]["listed"] == report["published"]["usable"] + report["published"]["unusable"]
    # the chaos it promised happened
    names = {c["name"] for c in report["chaos"]}
    assert {"sigkill", "redis restart", "broker flush", "hang picture", "burst"} <= names
    assert len(report["verdict"]) >= 5


def test_log_reading_attributes_tracebacks_to_rows_and_flags_the_rest(tmp_path) -> None:
    db = tmp_path / "rows.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "create table post (id integer, site text, remote_id integer, state text, reason text, attempts integer,"
            " updated_at text, claim_token text)"
        )
        conn.execute("create table scrape_cursor (tag text, newest_id integer, last_error text, last_poll_at text)")
        conn.execute("insert into post values (7, 'safebooru', 1007, 'failed', 'boom', 1, '2026-01-01 00:00:00', null)")
        conn.execute("insert into post values (8, 'safebooru', 1008, 'downloaded', null, 0, '2026-01-01', 'tok')")
        # one tag's polling stopped long ago with no error recorded; the other failed and says so
        conn.execute("insert into scrape_cursor values ('quiet_tag', 1, null, '2026-01-01 00:00:00')")
        conn.execute("insert into scrape_cursor values ('loud_tag', 1, 'HTTP 503', '2026-01-01 00:00:00')")
    log = tmp_path / "run.log"
    log.write_text(
        "worker-cpu | 2026 ERROR waifu.detect: detect failed post=7\n"
        "worker-cpu | Traceback (most recent call last):\n"
        'worker-cpu |   File "x.py", line 1, in f\n'
        "worker-cpu | ValueError: boom\n"
        "worker-io | 2026 ERROR celery: something else\n"
        "worker-io | Traceback (most recent call last):\n"
        'worker-io |   File "y.py", line 2, in g\n'
        "worker-io | KeyError: 'k'\n"
        "worker-cpu | Task handler raised error: WorkerLostError('Worker exited prematurely: signal 9 (SIGKILL)')\n"
    )
    observer = Observer(f"sqlite:///{db}", log, [], recovery_bound=600, lost_after=60, started=time.time() - 3600)
    observer.sample_rows()
    observer.snapshot_claims()  # row 8 is held by a worker "killed" now, and never moves after
    observer.scan_log()
    report = observer.report()

    assert report["tracebacks"]["total"] == 2
    assert report["tracebacks"]["attributed_to_a_row"] == 1
    assert [t["exception"] for t in report["tracebacks"]["unattributed"]] == ["KeyError: 'k'"]
    assert report["worker_lost_log_lines"] == 1
    assert [r["remote_id"] for r in report["claimed_at_kill_without_outcome"]] == [1008]
    assert report["rows_past_bound"][0]["post"] == 1008  # waiting since 2026-01-01
    assert [t["tag"] for t in report["silent_tags"]] == ["quiet_tag"]
    assert report["verdict"][2].startswith("FAIL: 3 errors swallowed")
