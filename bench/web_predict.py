"""API predict latency: POST /api/predict over real HTTP (uvicorn in this process, the application as served),
per illustration, detection included, at 1 and at 4 concurrent clients.

A model is trained first (the shared set's 96x96 crops, weights=none, as the tests do) into a throw-away data
dir and SQLite file. The pictures are the raw illustrations the test crops were cut from. The baseline, in
the same run, is predict/'s own `classify_image` called directly in this process on the same pictures (what
`waifu predict` does per file once its model is loaded): the ratio says what HTTP, the upload, the queue and
the boxed answer add. The model is loaded once per process: the run checks the namer's load count.

    WAIFU_TEST_DATA=... WAIFU_BROKER_URL=redis://127.0.0.1:6379/N python -m bench.web_predict [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKEN = "bench-token-0123456789abcdef"


def prepare(work: Path) -> None:
    """A data dir with every shared crop as a tag-labelled face, and a current model trained on them."""
    os.environ.update(
        {
            "WAIFU_DATA_DIR": str(work),
            "WAIFU_DATABASE_URL": f"sqlite:///{work / 'waifu.db'}",
            "WAIFU_BACKBONE_WEIGHTS": "none",
            "WAIFU_TRAIN_EPOCHS": os.environ.get("WAIFU_TRAIN_EPOCHS", "10"),
            "WAIFU_TRAIN_THREADS": "2",
            "WAIFU_WEAK_LABELS": "false",
            "WAIFU_WEB_API_TOKEN": TOKEN,
        }
    )
    from core.settings import get_settings, reset_settings_cache
    from db.migrate import upgrade
    from tests.support.fixtures import add_faces
    from train.retrain import run_retrain

    reset_settings_cache()
    upgrade(get_settings().database_url)
    add_faces()
    summary = run_retrain(get_settings())
    if summary["status"] != "current":
        raise SystemExit(f"no current model: {summary}")


def pictures() -> list[bytes]:
    """The illustrations the test crops come from (31.jpg onwards in each character's folder)."""
    from tests.support.testdata import raw_images

    return [path.read_bytes() for _tag, path in raw_images() if int(path.stem) >= 31]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the pictures per concurrency")
    args = parser.parse_args()
    import httpx

    work = Path(tempfile.mkdtemp(prefix="waifu-bench-web-predict-"))
    try:
        prepare(work)
        from core.images import open_image
        from core.settings import get_settings
        from predict.classify import classify_image, load_current
        from waifu.web.app import create_app
        from waifu.web.server import serving_in_thread

        settings = get_settings()
        files = pictures()
        _version, classifier = load_current(settings)
        direct = []
        for data in files * args.rounds:
            started = time.perf_counter()
            classify_image(classifier, open_image(data, settings.max_image_pixels), settings)
            direct.append(time.perf_counter() - started)
        app = create_app(settings)
        rows = [("direct classify_image (baseline)", 1, direct, sum(direct))]
        with serving_in_thread(settings, app=app) as base:
            for clients in (1, 4):
                with httpx.Client(base_url=base, timeout=300, headers={"authorization": f"Bearer {TOKEN}"}) as api:

                    def ask(data: bytes, api=api) -> float:
                        started = time.perf_counter()
                        answer = api.post("/api/predict", files={"picture": ("p.jpg", data, "image/jpeg")})
                        answer.raise_for_status()
                        return time.perf_counter() - started

                    ask(files[0])  # the first request loads the model: not counted
                    wall = time.perf_counter()
                    with ThreadPoolExecutor(clients) as pool:
                        latencies = list(pool.map(ask, files * args.rounds))
                    rows.append(
                        (f"POST /api/predict, {clients} client(s)", clients, latencies, time.perf_counter() - wall)
                    )
        base_median = statistics.median(direct)
        print(
            f"{len(files)} illustrations x {args.rounds} rounds, {os.cpu_count()} cores, "
            f"model loads: {app.state.namer.loads}"
        )
        print(f"{'':42} {'median s':>9} {'p90 s':>7} {'x baseline':>10} {'pictures/s':>10}")
        for name, _clients, values, wall in rows:
            median = statistics.median(values)
            print(
                f"{name:42} {median:9.3f} {percentile(values, 0.9):7.3f} {median / base_median:10.2f} "
                f"{len(values) / wall:10.2f}"
            )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
