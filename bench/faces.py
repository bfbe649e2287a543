"""Face benchmark on the raw illustrations of the test set (107 real ones, tests/testdata.py).

1. Per detector: share of images with a face, faces found, latency median and p90 (one process, one thread).
2. Throughput of the cpu queue (real Celery worker processes: detect_faces + resize_face through Redis and
   SQLite) with 1 and 2 worker processes, against the notebook's sequential loop (lbpcascade, crop, resize,
   save, one file at a time) on the same files in the same run, printed as ratios.

    python -m bench.faces [--skip-queue]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def images() -> list[Path]:
    from tests.testdata import raw_images  # a local copy (WAIFU_TEST_DATA) or the pinned, checksummed fetch

    return [p for _t, p in raw_images()]


def detector_table(console, paths: list[Path]) -> None:  # noqa: ANN001
    from rich.progress import track
    from rich.table import Table

    from core.images import open_image
    from core.settings import Settings
    from detect.detectors import find_faces, pin_opencv_threads

    pin_opencv_threads(1)
    variants = {
        "lbpcascade": ("lbpcascade", False),
        "animeface": ("animeface", False),
        "both (no fallbacks)": ("both", False),
        "both + fallbacks (default)": ("both", True),
    }
    table = Table(title=f"face detection on the raw test set ({len(paths)} images, 1 thread)")
    for col in ("detector", "images with a face", "faces", "median s", "p90 s"):
        table.add_column(col, justify="right" if col != "detector" else "left")
    loaded = [open_image(p) for p in paths]
    for name, (detector, fallbacks) in variants.items():
        settings = Settings(_env_file=None, detector_fallbacks=fallbacks)
        times, hits, faces = [], 0, 0
        for image in track(loaded, description=name, console=console, transient=True):
            started = time.perf_counter()
            found = find_faces(image, detector, settings)
            times.append(time.perf_counter() - started)
            hits += bool(found)
            faces += len(found)
        times.sort()
        table.add_row(name, f"{hits / len(paths):.1%}", str(faces), f"{statistics.median(times):.3f}",
                      f"{times[int(0.9 * (len(times) - 1))]:.3f}")
    console.print(table)


def notebook_loop(paths: list[Path], out: Path) -> float:
    """The original notebook's way: lbpcascade, crop the box, resize to 96x96, save; one file at a time."""
    import cv2

    from detect.detectors import SHIPPED_CASCADE

    cv2.setNumThreads(1)
    cascade = cv2.CascadeClassifier(str(SHIPPED_CASCADE))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for i, path in enumerate(paths):
        image = cv2.imread(str(path))
        if image is None:
            continue
        gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
        for j, (x, y, w, h) in enumerate(cascade.detectMultiScale(gray, 1.1, 5, minSize=(24, 24))):
            face = cv2.resize(image[y:y + h, x:x + w], (96, 96))
            cv2.imwrite(str(out / f"{i}_{j}.png"), face)
    return time.perf_counter() - started


def queue_run(paths: list[Path], workers: int, tmp: Path) -> tuple[float, int]:
    """All images as downloaded posts, detect_faces enqueued, a real `-c N` cpu worker drains the queue."""
    import redis
    from sqlmodel import func, select

    from core.settings import get_settings, reset_settings_cache
    from db.engine import session_scope
    from db.migrate import upgrade
    from db.models import Face, Post, PostState
    from worker.steps import enqueue

    data = tmp / f"data-{workers}"
    os.environ["WAIFU_DATA_DIR"] = str(data)
    os.environ["WAIFU_DATABASE_URL"] = f"sqlite:///{data / 'waifu.db'}"
    reset_settings_cache()
    settings = get_settings()
    data.mkdir(parents=True)
    upgrade()
    redis.Redis.from_url(settings.broker_url).flushdb()
    with session_scope() as session:
        for i, path in enumerate(paths):
            raw = path.read_bytes()
            md5 = hashlib.md5(raw).hexdigest()
            relative = Path("images") / md5[:2] / f"{md5}{path.suffix.lower()}"
            (data / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, data / relative)
            session.add(Post(id=i + 1, md5=md5, file_url="https://safebooru.org//x", state=PostState.downloaded,
                             stored_path=relative.as_posix()))
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", "cpu", "-c", str(workers),
         "--loglevel", "WARNING", "--without-mingle", "--without-gossip"],
        env={**os.environ}, cwd=ROOT, start_new_session=True,
    )
    try:
        time.sleep(4)  # worker start-up is not part of the measured time
        started = time.perf_counter()
        enqueue("detect", range(1, len(paths) + 1))
        while True:
            with session_scope() as session:
                pending = session.exec(select(func.count()).select_from(Post).where(
                    Post.state.in_([PostState.downloaded, PostState.detected]))).one()
                faces = session.exec(select(func.count()).select_from(Face).where(Face.state == "ready")).one()
            if pending == 0:
                return time.perf_counter() - started, faces
            time.sleep(0.2)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-queue", action="store_true", help="only the per-detector table")
    args = parser.parse_args()
    os.environ.setdefault("WAIFU_BROKER_URL", os.environ.get("WAIFU_BENCH_REDIS_URL", "redis://127.0.0.1:6379/11"))
    os.environ["WAIFU_LOG_LEVEL"] = "WARNING"
    from rich.console import Console
    from rich.table import Table

    console = Console()
    paths = images()
    detector_table(console, paths)
    if args.skip_queue:
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="waifu-bench-faces-"))
    try:
        baseline = notebook_loop(paths, tmp / "notebook")
        table = Table(title="cpu queue throughput vs the notebook's sequential loop (same files, same run)")
        for col in ("pipeline", "seconds", "images/s", "ratio to notebook", "faces kept"):
            table.add_column(col, justify="right" if col != "pipeline" else "left")
        notebook_faces = len(list((tmp / "notebook").glob("*.png")))
        table.add_row("notebook loop (lbpcascade only)", f"{baseline:.1f}", f"{len(paths) / baseline:.2f}", "1.00",
                      str(notebook_faces))
        for workers in (1, 2):
            seconds, faces = queue_run(paths, workers, tmp)
            table.add_row(f"cpu queue, {workers} process(es), detector both", f"{seconds:.1f}",
                          f"{len(paths) / seconds:.2f}", f"{baseline / seconds:.2f}", str(faces))
        console.print(table)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
