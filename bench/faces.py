"""Face benchmark on the illustrations of the test set (tests/support/testdata.py): the 107 of `raw/` and the 21 of
`raw (unrecognized)/`, and two degraded copies of `raw/` (scaled to 15 % of each side: small faces; rotated
35 degrees: tilted heads; tests/support/checked.py builds them).

1. Detection before vs after (issue 13), same files, same run, one process, one thread, each image timed
   with both paths back to back: before = every pass on the full image (WAIFU_DETECTOR_MAX_PIXELS=0),
   after = the defaults. Share of images with a face, faces, latency median / p90 / mean.
2. Per detector at the defaults (full-size set).
3. The face check (issue 11) on the hand-checked list, tests/support/checked_detections.csv: the defaults' own
   detections matched to it (precision, images with a true face, with and without the check), and the
   check alone on every checked row, with the shipped weights and leave-one-character-out (fitted on two
   characters, judged on the third).
4. Throughput of the cpu queue (real Celery worker processes: the detect and crop tasks through Redis and
   SQLite) with 1 and 2 worker processes, against the notebook's sequential loop (lbpcascade, crop, resize,
   save, one file at a time) on the same files in the same run, printed as ratios.

    python -m bench.faces [--skip-queue] [--fit-check]

--fit-check only fits the face check's weights on the whole checked list and prints them (for
detect/verify.py), with the leave-one-character-out figures.
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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
UNRECOGNIZED = "raw (unrecognized)"  # upstream folder: illustrations in which lbpcascade alone found nothing
SETS = {"": "full size", "scaled15": "scaled to 15 %", "rot35": "rotated 35 degrees"}


def images() -> list[Path]:
    from tests.support.testdata import raw_images  # a local copy (WAIFU_TEST_DATA) or the pinned, checksummed fetch

    return [p for _t, p in raw_images()]


def illustrations() -> list[tuple[str, Path]]:
    """(upstream name, file) of every illustration: raw/ then raw (unrecognized)/."""
    from tests.support.testdata import data_files, names_under, raw_names

    names = raw_names() + sorted(names_under(UNRECOGNIZED))
    return list(zip(names, data_files(names), strict=True))


@dataclass
class Run:
    """One detection path over one set: per image, seconds and detections."""

    seconds: list[float] = field(default_factory=list)
    found: dict[str, list] = field(default_factory=dict)  # upstream name -> detections

    def row(self) -> list[str]:
        times = sorted(self.seconds)
        hits = sum(1 for d in self.found.values() if d)
        return [
            f"{hits / len(self.found):.1%}",
            str(sum(len(d) for d in self.found.values())),
            f"{statistics.median(times):.3f}",
            f"{times[int(0.9 * (len(times) - 1))]:.3f}",
            f"{statistics.mean(times):.3f}",
        ]


def timed(image, settings):
    from detect.detectors import find_faces

    started = time.process_time()  # CPU time of this process: other work on the machine adds less noise
    found = find_faces(image, "both", settings)
    return time.process_time() - started, found


def before_after(console, named: list[tuple[str, Path]]) -> dict[str, dict[str, Run]]:
    """{variant: {"before": Run, "after": Run}}; both paths on each image back to back (same conditions)."""
    from rich.progress import track

    from core.images import open_image
    from core.settings import Settings
    from tests.support.checked import degraded

    before = Settings(_env_file=None, detector_max_pixels=0)
    after = Settings(_env_file=None)
    runs = {v: {"before": Run(), "after": Run()} for v in SETS}
    for name, path in track(named, description="before vs after", console=console, transient=True):
        original = open_image(path)
        for variant in SETS:
            if variant and not name.startswith("raw/"):
                continue  # degraded copies: of raw/ only, as measured before
            image = degraded(original, variant)
            for label, settings in (("before", before), ("after", after)):
                seconds, found = timed(image, settings)
                runs[variant][label].seconds.append(seconds)
                runs[variant][label].found[name] = found
    return runs


def latency_table(console, runs: dict[str, dict[str, Run]]) -> None:
    from rich.table import Table

    from core.settings import Settings

    pixels = Settings(_env_file=None).detector_max_pixels
    table = Table(
        title=f"detection before vs after, same files, same run (1 thread, CPU s per image); after: "
        f"a working copy of at most {pixels:,} pixels, fallbacks on it"
    )
    for col in ("images", "path", "images with a face", "faces", "median s", "p90 s", "mean s"):
        table.add_column(col, justify="left" if col in ("images", "path") else "right")
    for variant, pair in runs.items():
        for label in ("before", "after"):
            run = pair[label]
            table.add_row(f"{SETS[variant]} ({len(run.found)})", label, *run.row())
    console.print(table)


def detector_table(console, named: list[tuple[str, Path]]) -> None:
    from rich.progress import track
    from rich.table import Table

    from core.images import open_image
    from core.settings import Settings
    from detect.detectors import find_faces

    variants = {
        "lbpcascade": ("lbpcascade", False),
        "animeface": ("animeface", False),
        "both (no fallbacks)": ("both", False),
        "both + fallbacks (default)": ("both", True),
    }
    table = Table(title=f"face detection per detector, defaults ({len(named)} full-size illustrations, 1 thread)")
    for col in ("detector", "images with a face", "faces", "median s", "p90 s"):
        table.add_column(col, justify="right" if col != "detector" else "left")
    loaded = [open_image(p) for _n, p in named]
    for name, (detector, fallbacks) in variants.items():
        settings = Settings(_env_file=None, detector_fallbacks=fallbacks)
        times, hits, faces = [], 0, 0
        for image in track(loaded, description=name, console=console, transient=True):
            started = time.process_time()
            found = find_faces(image, detector, settings)
            times.append(time.process_time() - started)
            hits += bool(found)
            faces += len(found)
        times.sort()
        table.add_row(
            name,
            f"{hits / len(loaded):.1%}",
            str(faces),
            f"{statistics.median(times):.3f}",
            f"{times[int(0.9 * (len(times) - 1))]:.3f}",
        )
    console.print(table)


# ---------------------------------------------------------------------------- face check ----
def checked_features(console) -> tuple[list, list[dict[str, float]]]:
    """Every checked row and the face check's measurements of it."""
    from rich.progress import track

    from core.images import open_image
    from detect.verify import features
    from tests.support import checked
    from tests.support.testdata import data_file

    rows = checked.load()
    values: dict[int, dict[str, float]] = {}
    by_image: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(rows):
        by_image.setdefault((row.file, row.variant), []).append(i)
    for (file, variant), indices in track(
        sorted(by_image.items()), description="face check on the checked list", console=console, transient=True
    ):
        image = checked.degraded(open_image(data_file(file)), variant)
        for i in indices:
            values[i] = features(image, rows[i].detection)
    return rows, [values[i] for i in range(len(rows))]


def leave_one_character_out(rows: list, values: list[dict[str, float]]) -> list[float]:
    """Face probability of each row from weights fitted on the other characters' rows only."""
    import numpy as np

    from detect.verify import WEIGHTS

    names = list(WEIGHTS)
    x = np.array([[v[n] for n in names] for v in values])
    y = np.array([r.is_face for r in rows], dtype=int)
    characters = np.array([r.character for r in rows])
    out = np.zeros(len(rows))
    for character in sorted(set(characters)):
        held = characters == character
        out[held] = fit(x[~held], y[~held]).predict_proba(x[held])[:, 1]
    return out.tolist()


def fit(x, y):
    from sklearn.linear_model import LogisticRegression  # the `train` extra; only here, never at run time

    return LogisticRegression(C=1.0, max_iter=5000).fit(x, y)


def judged(rows: list, probabilities: list[float], variant: str | None) -> tuple[int, int, int, int]:
    """(faces kept, faces, not-faces kept, not-faces) at the shipped threshold."""
    from detect.verify import THRESHOLD

    picked = [(r, p) for r, p in zip(rows, probabilities, strict=True) if variant is None or r.variant == variant]
    faces = [p for r, p in picked if r.is_face]
    others = [p for r, p in picked if not r.is_face]
    return (sum(p >= THRESHOLD for p in faces), len(faces), sum(p >= THRESHOLD for p in others), len(others))


def check_tables(console, runs: dict[str, dict[str, Run]], named: list[tuple[str, Path]]) -> None:
    from rich.table import Table

    from core.images import open_image
    from detect.verify import check_faces, probability
    from tests.support import checked

    rows, values = checked_features(console)
    shipped = [probability(v) for v in values]
    try:
        held_out = leave_one_character_out(rows, values)
    except ImportError:
        held_out = None  # scikit-learn is in the `train` extra
    table = Table(
        title=f"face check alone on the {len(rows)} hand-checked detections (tests/support/checked_detections.csv)"
    )
    for col in ("detections of", "weights", "faces kept", "not-faces kept", "precision"):
        table.add_column(col, justify="left" if col in ("detections of", "weights") else "right")
    for variant in (None, *SETS):
        for label, probabilities in (("shipped (fitted on all)", shipped), ("leave one character out", held_out)):
            if probabilities is None:
                continue
            kept, faces, wrong, others = judged(rows, probabilities, variant)
            table.add_row(
                "all" if variant is None else SETS[variant],
                label,
                f"{kept}/{faces} ({kept / faces:.1%})",
                f"{wrong}/{others}",
                f"{kept / max(1, kept + wrong):.1%}",
            )
    console.print(table)

    # the defaults end to end: their own detections, matched to the checked list, with and without the check
    files = dict(named)
    table = Table(title="defaults end to end on the checked list: detections matched to their hand label")
    for col in ("images", "check", "detections", "not in list", "not faces", "precision", "images with a true face"):
        table.add_column(col, justify="left" if col in ("images", "check") else "right")
    for variant, pair in runs.items():
        run = pair["after"]
        counts = {"off": [0, 0, 0, 0], "on": [0, 0, 0, 0]}  # detections, unmatched, not faces, images with a face
        for name, found in run.found.items():
            verdicts = None
            if found:
                image = checked.degraded(open_image(files[name]), variant)
                verdicts = check_faces(image, found)
            for mode in ("off", "on"):
                kept = [d for i, d in enumerate(found) if mode == "off" or verdicts[i].face]
                labels = [checked.match(rows, name, variant, d) for d in kept]
                counts[mode][0] += len(kept)
                counts[mode][1] += sum(m is None for m in labels)
                counts[mode][2] += sum(m is not None and not m.is_face for m in labels)
                counts[mode][3] += any(m is not None and m.is_face for m in labels)
        for mode, (total, unmatched, wrong, hits) in counts.items():
            matched = total - unmatched
            table.add_row(
                f"{SETS[variant]} ({len(run.found)})",
                mode,
                str(total),
                str(unmatched),
                str(wrong),
                f"{(matched - wrong) / max(1, matched):.1%}",
                f"{hits / len(run.found):.1%}",
            )
    console.print(table)


def fit_check(console) -> None:
    """Fits the face check's weights on every checked row; prints them for detect/verify.py."""
    import numpy as np

    from detect.verify import WEIGHTS

    rows, values = checked_features(console)
    names = list(WEIGHTS)
    model = fit(np.array([[v[n] for n in names] for v in values]), np.array([r.is_face for r in rows], dtype=int))
    console.print("WEIGHTS = {")
    for name, weight in zip(names, model.coef_[0], strict=True):
        console.print(f'    "{name}": {weight:.2f},')
    console.print("}")
    console.print(f"BIAS = {model.intercept_[0]:.2f}")
    held_out = leave_one_character_out(rows, values)
    for variant in (None, *SETS):
        kept, faces, wrong, others = judged(rows, held_out, variant)
        console.print(
            f"leave one character out, {'all' if variant is None else SETS[variant]}: faces kept "
            f"{kept}/{faces}, not-faces kept {wrong}/{others}"
        )


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
            face = cv2.resize(image[y : y + h, x : x + w], (96, 96))
            cv2.imwrite(str(out / f"{i}_{j}.png"), face)
    return time.perf_counter() - started


def queue_run(paths: list[Path], workers: int, tmp: Path) -> tuple[float, int]:
    """All images as downloaded posts, the detect task enqueued, a real `-c N` cpu worker drains the queue."""
    import redis
    from sqlmodel import func, select

    from core.settings import get_settings, reset_settings_cache
    from db.engine import session_scope
    from db.migrate import upgrade
    from db.models import Face, Post, PostState
    from waifu.celery_argv import celery_argv
    from worker.queue import enqueue

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
            session.add(
                Post(
                    id=i + 1,
                    md5=md5,
                    file_url="https://safebooru.org//x",
                    state=PostState.downloaded,
                    stored_path=relative.as_posix(),
                )
            )
    worker = subprocess.Popen(
        celery_argv(
            [
                "worker",
                "-Q",
                "cpu",
                "-c",
                str(workers),
                "--loglevel",
                "WARNING",
                "--without-mingle",
                "--without-gossip",
            ]
        ),
        env={**os.environ},
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        time.sleep(4)  # worker start-up is not part of the measured time
        started = time.perf_counter()
        enqueue("detect", range(1, len(paths) + 1))
        while True:
            with session_scope() as session:
                pending = session.exec(
                    select(func.count())
                    .select_from(Post)
                    .where(Post.state.in_([PostState.downloaded, PostState.detected]))
                ).one()
                faces = session.exec(select(func.count()).select_from(Face).where(Face.state == "ready")).one()
            if pending == 0:
                return time.perf_counter() - started, faces
            time.sleep(0.2)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-queue", action="store_true", help="no cpu-queue throughput")
    parser.add_argument("--fit-check", action="store_true", help="only fit and print the face check's weights")
    args = parser.parse_args()
    os.environ.setdefault("WAIFU_BROKER_URL", os.environ.get("WAIFU_BENCH_REDIS_URL", "redis://127.0.0.1:6379/11"))
    os.environ["WAIFU_LOG_LEVEL"] = "WARNING"
    from rich.console import Console
    from rich.table import Table

    from detect.detectors import pin_opencv_threads

    pin_opencv_threads(1)
    console = Console()
    if args.fit_check:
        fit_check(console)
        return 0
    named = illustrations()
    runs = before_after(console, named)
    latency_table(console, runs)
    detector_table(console, named)
    check_tables(console, runs, named)
    if args.skip_queue:
        return 0
    paths = images()
    tmp = Path(tempfile.mkdtemp(prefix="waifu-bench-faces-"))
    try:
        baseline = notebook_loop(paths, tmp / "notebook")
        table = Table(title="cpu queue throughput vs the notebook's sequential loop (same files, same run)")
        for col in ("pipeline", "seconds", "images/s", "ratio to notebook", "faces kept"):
            table.add_column(col, justify="right" if col != "pipeline" else "left")
        notebook_faces = len(list((tmp / "notebook").glob("*.png")))
        table.add_row(
            "notebook loop (lbpcascade only)",
            f"{baseline:.1f}",
            f"{len(paths) / baseline:.2f}",
            "1.00",
            str(notebook_faces),
        )
        for workers in (1, 2):
            seconds, faces = queue_run(paths, workers, tmp)
            table.add_row(
                f"cpu queue, {workers} process(es), detector both",
                f"{seconds:.1f}",
                f"{len(paths) / seconds:.2f}",
                f"{baseline / seconds:.2f}",
                str(faces),
            )
        console.print(table)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
