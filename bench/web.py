"""Web page benchmark: the faces page with 100,000 faces, on SQLite and PostgreSQL.

Synthetic rows (no images): 40,000 posts, 100,000 faces of 8 characters (one of them rare), about half
`ambiguous` with a suggestion, as a real collection looks. For each filter the page is fetched over HTTP from the real
application (uvicorn in this process, template rendered) for a page of 200: the median of several runs is
the server-side answer time. The page's database work alone (waifu.web.queries.faces_page) is timed too, and
again with the indexes of migration 0005 dropped (the baseline, same run): the ratio says what they buy.

    python -m bench.web [--faces 100000] [--runs 7] [--backends sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POSTGRES_URL = os.environ.get("WAIFU_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
CHARACTERS = ["hifumi", "aoba", "kou", "rin", "hajime", "yun", "nene", "umiko"]
SCENARIOS = {
    "no filter (ready)": "",
    "ambiguous": "source=ambiguous",
    "ambiguous, has suggestion, p < 0.6": "source=ambiguous&suggested=yes&below=0.6",
    "character (label or suggestion)": "character=rin",
    "rare character (1 face in 500)": "character=umiko",
    "very unsure suggestions, p < 0.21": "below=0.21",
    "manual, test split": "source=manual&split=test",
    "rejected": "state=rejected",
    "one post": "post=20000&state=any",
    "deep page (after id 90,000)": "after=90000",
    "page before id 50,000, ambiguous": "source=ambiguous&before=50000",
    "most useful first (order=useful)": "order=useful",
    "most useful first, ambiguous": "source=ambiguous&order=useful",
}
INDEXES = {
    "ix_face_source_state_id": ["label_source", "state", "id"],
    "ix_face_suggestion": ["suggestion"],
    "ix_face_suggestion_score": ["suggestion_score"],
}


def fill(url: str, faces: int, seed: int = 0) -> None:
    """Characters, posts, post-character links and faces, inserted in batches (Core, no ORM objects)."""
    from sqlalchemy import insert

    from db.engine import engine_for
    from db.models import Character, Face, Post, PostCharacter

    rng = random.Random(seed)

    def pick() -> str:  # the last character is rare (1 face in 500), as a newly added one is
        return CHARACTERS[-1] if rng.random() < 0.002 else rng.choice(CHARACTERS[:-1])

    engine = engine_for(url)
    posts = max(1, faces * 2 // 5)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(
            insert(Character), [{"tag": c, "extra_terms": "", "ratings": "", "created_at": start} for c in CHARACTERS]
        )
        ids = {tag: i + 1 for i, tag in enumerate(CHARACTERS)}
        for first in range(1, posts + 1, 5000):
            batch = range(first, min(posts + 1, first + 5000))
            conn.execute(
                insert(Post),
                [
                    {
                        "id": p,
                        "md5": f"{p:032x}",
                        "file_url": "https://safebooru.org/x",
                        "image": "",
                        "directory": "",
                        "rating": "",
                        "tags": "",
                        "source": "",
                        "state": "done",
                        "attempts": 0,
                        "faces": 2,
                        "stored_path": None,
                        "created_at": start,
                        "updated_at": start,
                    }
                    for p in batch
                ],
            )
            links = []
            for p in batch:
                for tag in rng.sample(CHARACTERS, rng.choice((1, 1, 2))):
                    links.append({"post_id": p, "character_id": ids[tag]})
            conn.execute(insert(PostCharacter), links)
        rows = []
        for face_id in range(1, faces + 1):
            roll = rng.random()
            source = "ambiguous" if roll < 0.5 else "tag" if roll < 0.93 else "manual"
            state = "rejected" if rng.random() < 0.03 else "ready"
            label = None if source == "ambiguous" else pick()
            suggested = source == "ambiguous" and rng.random() < 0.9
            rows.append(
                {
                    "post_id": 1 + (face_id - 1) * posts // faces,
                    "detector": "animeface",
                    "score": 0.9,
                    "x": 10,
                    "y": 10,
                    "w": 50,
                    "h": 50,
                    "crop_left": 0,
                    "crop_top": 0,
                    "crop_right": 70,
                    "crop_bottom": 70,
                    "state": state,
                    "path": f"faces/{face_id:06d}.png",
                    "sha256": None,
                    "phash": None,
                    "label": label,
                    "label_source": source,
                    "split": "test" if rng.random() < 0.15 else "train",
                    "suggestion": pick() if suggested else None,
                    "suggestion_score": round(rng.uniform(0.2, 1.0), 3) if suggested else None,
                    "created_at": start + timedelta(minutes=face_id),
                    "updated_at": start,
                }
            )
            if len(rows) == 5000:
                conn.execute(insert(Face), rows)
                rows = []
        if rows:
            conn.execute(insert(Face), rows)
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE")
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")


def set_indexes(url: str, present: bool) -> None:
    from db.engine import engine_for

    engine = engine_for(url)
    with engine.begin() as conn:
        for name, columns in INDEXES.items():
            if present:
                conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {name} ON face ({', '.join(columns)})")
            else:
                conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
        conn.exec_driver_sql("ANALYZE")


def measure(base: str, runs: int) -> dict[str, float]:
    """Median seconds of GET /faces?... (page of 200) per scenario, after one warm-up request."""
    import httpx

    timings = {}
    with httpx.Client(base_url=base, headers={"accept": "text/html"}, timeout=60) as client:
        for name, query in SCENARIOS.items():
            url = f"/faces?{query}"
            first = client.get(url)
            assert first.status_code == 200, (url, first.status_code, first.text[:300])
            times = []
            for _ in range(runs):
                started = time.perf_counter()
                response = client.get(url)
                times.append(time.perf_counter() - started)
                assert response.status_code == 200
            timings[name] = statistics.median(times)
    return timings


def measure_queries(runs: int) -> dict[str, float]:
    """Median seconds of the page's database work alone (waifu.web.queries.faces_page) per scenario."""
    from urllib.parse import parse_qsl

    from db.engine import session_scope
    from waifu.web.queries import faces_page, parse_filter

    timings = {}
    for name, query in SCENARIOS.items():
        face_filter = parse_filter(dict(parse_qsl(query)))
        times = []
        with session_scope(readonly=True) as session:
            faces_page(session, face_filter)  # warm-up
            for _ in range(runs):
                started = time.perf_counter()
                faces_page(session, face_filter)
                times.append(time.perf_counter() - started)
        timings[name] = statistics.median(times)
    return timings


def run_backend(backend: str, faces: int, runs: int, tmp: Path) -> tuple[dict[str, float], ...]:
    from sqlalchemy import create_engine, text

    from core.settings import get_settings, reset_settings_cache
    from db.migrate import upgrade
    from waifu.web.server import serving_in_thread

    admin = None
    if backend == "sqlite":
        url = f"sqlite:///{tmp / 'bench-web.db'}"
    else:
        name = f"waifu_bench_web_{uuid.uuid4().hex[:8]}"
        admin = create_engine(
            POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = f"{POSTGRES_URL.rpartition('/')[0]}/{name}"
    os.environ["WAIFU_DATABASE_URL"] = url
    reset_settings_cache()
    try:
        upgrade(url)
        started = time.perf_counter()
        fill(url, faces)
        fill_s = time.perf_counter() - started
        with serving_in_thread(get_settings()) as base:
            http = measure(base, runs)
        queries = measure_queries(runs)
        set_indexes(url, present=False)
        without = measure_queries(runs)
        set_indexes(url, present=True)
        return http, queries, without, fill_s
    finally:
        if admin is not None:
            from db.engine import engine_for

            engine_for(url).dispose()
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rpartition("/")[2]}" WITH (FORCE)'))
            admin.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    with tempfile.TemporaryDirectory(prefix="waifu-bench-web-") as tmp:
        os.environ["WAIFU_DATA_DIR"] = str(Path(tmp) / "data")
        os.environ.pop("WAIFU_WEB_USER", None)
        os.environ.pop("WAIFU_WEB_PASSWORD", None)
        for backend in args.backends.split(","):
            http, queries, without, fill_s = run_backend(backend.strip(), args.faces, args.runs, Path(tmp))
            table = Table(
                title=f"GET /faces, page of 200, {args.faces:,} faces, {backend} "
                f"(median of {args.runs}; rows inserted in {fill_s:.0f} s)"
            )
            for column in ("filter", "HTTP ms", "queries ms", "queries ms without 0005 indexes", "ratio"):
                table.add_column(column, justify="left" if column == "filter" else "right")
            for name in SCENARIOS:
                table.add_row(
                    name,
                    f"{http[name] * 1000:.0f}",
                    f"{queries[name] * 1000:.1f}",
                    f"{without[name] * 1000:.1f}",
                    f"{without[name] / queries[name]:.2f}x",
                )
            console.print(table)
            worst = max(http.values())
            console.print(
                f"{backend}: slowest page {worst * 1000:.0f} ms ({'under' if worst < 0.3 else 'OVER'} the 300 ms goal)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
