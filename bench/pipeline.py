"""Pipeline throughput through the real queue (issue 13), every figure a ratio against a baseline measured
in the same run, on the same files:

1. detect + crop + resize with lbpcascade only (the notebook's detector) through Redis and real Celery cpu
   worker processes, 1 and 2 of them, against the notebook's sequential loop (cv2.imread, the cascade, crop,
   resize to 96x96, save; one file at a time) — on SQLite and on PostgreSQL;
2. the same with the default detectors (`both` + fallbacks), as a share of the ceiling detection alone
   allows on this machine: (sum of one-process detection seconds) / cores;
3. the per-face cost of the crop step with 1k, 10k and 100k faces already in the database (synthetic ready
   rows with random perceptual hashes), relative to the 1k case.

    python -m bench.pipeline [--copies 2] [--skip-postgres] [--only queue|crop]

Real illustrations come from tests/support/testdata.py (WAIFU_TEST_DATA or the pinned download). Redis: database 11
of WAIFU_BENCH_REDIS_URL (default redis://127.0.0.1:6379/11); PostgreSQL: WAIFU_BENCH_POSTGRES_URL
(default postgresql://postgres@127.0.0.1:5432/test), a throw-away database per run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REDIS_URL = os.environ.get("WAIFU_BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
POSTGRES_URL = os.environ.get("WAIFU_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def illustrations(copies: int, tmp: Path) -> list[Path]:
    """The real raw set, `copies` times (each extra copy re-encoded, so every file is a different post)."""
    from PIL import Image

    from tests.support.testdata import raw_images

    paths = [p for _tag, p in raw_images()]
    out = list(paths)
    for c in range(1, copies):
        folder = tmp / f"copy{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(paths):
            target = folder / f"{i}.jpg"
            with Image.open(path) as im:
                im.convert("RGB").save(target, quality=90 - c)
            out.append(target)
    return out


# ------------------------------------------------------------------------------ baselines ----
def notebook_loop(paths: list[Path], out: Path) -> tuple[float, int]:
    """The original notebook's way: lbpcascade, crop the box, resize to 96x96, save; one file at a time."""
    import cv2

    from detect.detectors import SHIPPED_CASCADE

    cv2.setNumThreads(1)
    cascade = cv2.CascadeClassifier(str(SHIPPED_CASCADE))
    out.mkdir(parents=True, exist_ok=True)
    faces = 0
    started = time.perf_counter()
    for i, path in enumerate(paths):
        image = cv2.imread(str(path))
        if image is None:
            continue
        gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
        for j, (x, y, w, h) in enumerate(cascade.detectMultiScale(gray, 1.1, 5, minSize=(24, 24))):
            cv2.imwrite(str(out / f"{i}_{j}.png"), cv2.resize(image[y : y + h, x : x + w], (96, 96)))
            faces += 1
    return time.perf_counter() - started, faces


def detection_seconds(paths: list[Path], detector: str) -> float:
    """One process, one thread: the sum of what detection alone costs (decoding included, and the face check
    on every detection when it is on, as the detect step runs it: it is part of deciding what a face is)."""
    from core.images import open_image
    from core.settings import Settings
    from detect.detectors import find_faces, pin_opencv_threads
    from detect.verify import check_faces

    pin_opencv_threads(1)
    settings = Settings(_env_file=None, detector=detector)
    total = 0.0
    for path in paths:
        started = time.perf_counter()
        image = open_image(path)
        found = find_faces(image, detector, settings)
        if settings.face_verify and found:
            check_faces(image, found, settings)
        total += time.perf_counter() - started
    return total


# ------------------------------------------------------------------------------ the queue ----
def fresh_database(kind: str, tmp: Path) -> tuple[str, callable]:
    if kind == "sqlite":
        return f"sqlite:///{tmp / f'bench-{uuid.uuid4().hex[:6]}.db'}", lambda: None
    from sqlalchemy import create_engine, text

    name = f"waifu_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(
        POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        from db.engine import engine_for

        engine_for(f"{POSTGRES_URL.rpartition('/')[0]}/{name}").dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    return f"{POSTGRES_URL.rpartition('/')[0]}/{name}", drop


def queue_run(paths: list[Path], processes: int, detector: str, database: str, tmp: Path) -> tuple[float, int]:
    """Every image as a downloaded post, detection enqueued, `waifu worker --queues cpu` drains the queue;
    seconds from the first message to the last post `done`, and the faces kept."""
    import redis
    from sqlmodel import func, select

    from core.settings import get_settings, reset_settings_cache
    from db.engine import session_scope
    from db.migrate import upgrade
    from db.models import Face, FaceState, Post, PostState
    from worker.queue import enqueue

    data = tmp / f"data-{uuid.uuid4().hex[:6]}"
    env = {
        "WAIFU_DATA_DIR": str(data),
        "WAIFU_DATABASE_URL": database,
        "WAIFU_BROKER_URL": REDIS_URL,
        "WAIFU_DETECTOR": detector,
        "WAIFU_LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    reset_settings_cache()
    data.mkdir(parents=True)
    upgrade()
    redis.Redis.from_url(get_settings().broker_url).flushdb()
    with session_scope() as session:
        for i, path in enumerate(paths):
            raw = path.read_bytes()
            md5 = hashlib.md5(raw).hexdigest()
            relative = Path("images") / md5[:2] / f"{md5}{path.suffix.lower()}"
            (data / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, data / relative)
            session.add(
                Post(
                    id=i + 1,
                    md5=md5,
                    file_url="https://safebooru.org//x",
                    state=PostState.downloaded,
                    stored_path=relative.as_posix(),
                )
            )
    log = (tmp / "worker.log").open("ab")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "waifu.cli",
            "worker",
            "--queues",
            "cpu",
            "--concurrency",
            str(processes),
            "--loglevel",
            "WARNING",
        ],
        env={**os.environ, **env},
        cwd=ROOT,
        start_new_session=True,
        stdout=log,
        stderr=log,
    )
    try:
        time.sleep(5)  # worker start-up is not part of the measured time
        started = time.perf_counter()
        enqueue("detect", range(1, len(paths) + 1))
        while True:
            with session_scope(readonly=True) as session:
                pending = session.exec(
                    select(func.count())
                    .select_from(Post)
                    .where(Post.state.in_([PostState.downloaded, PostState.detected]))
                ).one()
            if pending == 0:
                seconds = time.perf_counter() - started
                break
            time.sleep(0.1)
        with session_scope(readonly=True) as session:
            faces = session.exec(select(func.count()).select_from(Face).where(Face.state == FaceState.ready)).one()
        return seconds, int(faces)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
        log.close()


# ------------------------------------------------------------------------------ crop cost ----
def crop_cost(existing: int, sample: list[Path], tmp: Path) -> float:
    """Median seconds of the crop step for one face with `existing` ready faces already in the database."""
    from sqlalchemy import insert

    from core.settings import get_settings, reset_settings_cache
    from crop.neardup import bands
    from crop.step import crop_face
    from db.engine import get_engine, session_scope
    from db.migrate import upgrade
    from db.models import Face, FaceHashBand, Post, PostState

    data = tmp / f"crop-{existing}"
    os.environ.update({"WAIFU_DATA_DIR": str(data), "WAIFU_DATABASE_URL": f"sqlite:///{data / 'w.db'}"})
    reset_settings_cache()
    data.mkdir(parents=True)
    upgrade()
    rng = random.Random(existing)
    engine = get_engine()
    with engine.begin() as conn:
        conn.execute(insert(Post), [{"id": 1, "md5": "0" * 32, "file_url": "x", "state": PostState.done}])
        batch = 5000
        for start in range(0, existing, batch):
            rows, band_rows = [], []
            for face_id in range(start + 1, min(existing, start + batch) + 1):
                phash = f"{rng.getrandbits(64):016x}"
                rows.append(
                    {
                        "id": face_id,
                        "post_id": 1,
                        "detector": "animeface",
                        "x": 0,
                        "y": 0,
                        "w": 10,
                        "h": 10,
                        "crop_left": 0,
                        "crop_top": 0,
                        "crop_right": 10,
                        "crop_bottom": 10,
                        "state": "ready",
                        "phash": phash,
                        "path": f"faces/{face_id}.png",
                        "split": "train",
                    }
                )
                band_rows += [{"band": b, "value": v, "face_id": face_id, "phash": phash} for b, v in bands(phash)]
            conn.execute(insert(Face), rows)
            conn.execute(insert(FaceHashBand), band_rows)
    timings = []
    settings = get_settings()
    for i, path in enumerate(sample):
        relative = f"images/{i}{path.suffix.lower()}"
        (data / "images").mkdir(exist_ok=True)
        shutil.copy(path, data / relative)
        with session_scope() as session:
            post = Post(
                id=1000 + i, md5=f"{i:032x}", file_url="x", state=PostState.detected, faces=1, stored_path=relative
            )
            session.add(post)
            session.flush()
            face = Face(
                post_id=post.id,
                detector="animeface",
                x=10,
                y=10,
                w=80,
                h=80,
                crop_left=0,
                crop_top=0,
                crop_right=100,
                crop_bottom=100,
            )
            session.add(face)
            session.flush()
            face_id = face.id
        started = time.perf_counter()
        crop_face(face_id, settings)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=2, help="times the raw set is used (re-encoded copies)")
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--only", choices=["queue", "crop"], default=None)
    args = parser.parse_args()
    os.environ["WAIFU_BROKER_URL"] = REDIS_URL
    os.environ["WAIFU_LOG_LEVEL"] = "WARNING"
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="waifu-bench-pipeline-"))
    try:
        paths = illustrations(args.copies, tmp)
        if args.only in (None, "queue"):
            nb_seconds, nb_faces = notebook_loop(paths, tmp / "notebook")
            table = Table(title=f"detect + crop through the real queue, {len(paths)} illustrations, {cores} cores")
            for col in ("run", "database", "seconds", "images/s", "vs notebook", "vs 1 process", "faces"):
                table.add_column(col, justify="left" if col in ("run", "database") else "right")
            table.add_row(
                "notebook loop, lbpcascade, 1 process",
                "-",
                f"{nb_seconds:.1f}",
                f"{len(paths) / nb_seconds:.2f}",
                "1.00",
                "",
                str(nb_faces),
            )
            for kind in ("sqlite",) + (() if args.skip_postgres else ("postgresql",)):
                one = None
                for processes in (1, 2):
                    database, drop = fresh_database(kind, tmp)
                    try:
                        seconds, faces = queue_run(paths, processes, "lbpcascade", database, tmp)
                    finally:
                        drop()
                    one = one or seconds
                    table.add_row(
                        f"queue, lbpcascade, {processes} process(es)",
                        kind,
                        f"{seconds:.1f}",
                        f"{len(paths) / seconds:.2f}",
                        f"{nb_seconds / seconds:.2f}",
                        f"{one / seconds:.2f}",
                        str(faces),
                    )
            console.print(table)

            ceiling_table = Table(title="default detectors (both + fallbacks) against the detection ceiling")
            for col in (
                "database",
                "detection + check, 1 process (s)",
                "ceiling at 2 processes (s)",
                "queue (s)",
                "share of ceiling",
            ):
                ceiling_table.add_column(col, justify="right")
            alone = detection_seconds(paths, "both")
            for kind in ("sqlite",) + (() if args.skip_postgres else ("postgresql",)):
                database, drop = fresh_database(kind, tmp)
                try:
                    seconds, _faces = queue_run(paths, 2, "both", database, tmp)
                finally:
                    drop()
                ceiling = alone / min(2, cores)
                ceiling_table.add_row(
                    kind, f"{alone:.1f}", f"{ceiling:.1f}", f"{seconds:.1f}", f"{ceiling / seconds:.2f}"
                )
            console.print(ceiling_table)
        if args.only in (None, "crop"):
            sample = paths[:15]
            costs = {n: crop_cost(n, sample, tmp) for n in (1_000, 10_000, 100_000)}
            crop_table = Table(title="crop step per face with N ready faces in the database (SQLite)")
            for col in ("faces in the database", "median s per face", "vs 1k"):
                crop_table.add_column(col, justify="right")
            for n, cost in costs.items():
                crop_table.add_row(f"{n:,}", f"{cost:.4f}", f"{cost / costs[1_000]:.2f}")
            console.print(crop_table)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
