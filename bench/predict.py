"""End-to-end prediction benchmark on the raw test illustrations (tests/support/testdata.py), with the service's own
pipeline.

Every illustration goes through the face pipeline's functions (detect with the default detector, square
crop with margin, 96x96); a picture with exactly one face is labelled by its folder (the `tag` rule) and
split by the crop's hash (85/15, as the service does). The classifier is trained on the train faces only
(weights=none), then `waifu predict`'s own code names the faces of the held-out test illustrations: the
share whose first face gets the right character is the number the issue's 85 % target is about.

    python -m bench.predict [--epochs N]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="CNN epochs (default: the chosen design's)")
    args = parser.parse_args()
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    from core.images import open_image
    from core.settings import Settings
    from crop.imaging import crop_face
    from detect.boxes import square_crop_box
    from detect.detectors import find_faces, pin_opencv_threads
    from labels.rules import split_for
    from predict.classify import classify_image
    from tests.support.testdata import raw_images
    from train.model import TrainConfig, load_dataset, train

    console = Console()
    settings = Settings(_env_file=None)  # the cascade shipped in detect/
    pin_opencv_threads(1)
    work = Path(tempfile.mkdtemp(prefix="waifu-bench-predict-"))
    train_items, test_posts, seen = [], [], set()
    for tag, path in track(raw_images(), description="detect + crop", console=console):
        data = path.read_bytes()
        if hashlib.md5(data).hexdigest() in seen:  # the repost in the set (takimoto_hifumi 3.jpg = 11.jpg)
            continue
        seen.add(hashlib.md5(data).hexdigest())
        image = open_image(data)
        faces = find_faces(image, settings.detector, settings)
        if len(faces) != 1:
            continue  # ambiguous or faceless: not trained on, as in the service
        crop = crop_face(image, square_crop_box(faces[0], image.size, settings.face_margin), 96)
        buffer = io.BytesIO()
        crop.save(buffer, format="PNG")
        digest = hashlib.sha256(buffer.getvalue()).hexdigest()
        if split_for(digest, settings.test_fraction) == "test":
            test_posts.append((tag, image))
        else:
            out = work / f"{digest}.png"
            out.write_bytes(buffer.getvalue())
            train_items.append((out, tag))
    overrides = {"epochs": args.epochs} if args.epochs else {}
    started = time.perf_counter()
    dataset = load_dataset(train_items, size=96)
    result = train(dataset, TrainConfig(**overrides))
    train_s = time.perf_counter() - started
    right, unknown, timings = 0, 0, []
    for tag, image in test_posts:
        t = time.perf_counter()
        faces = classify_image(result.classifier, image, settings)
        timings.append(time.perf_counter() - t)
        right += bool(faces) and faces[0]["top"][0]["name"] == tag
        unknown += bool(faces) and faces[0]["name"] == "unknown"
    table = Table(title="waifu predict on held-out illustrations (raw test set, weights=none)")
    for col in ("train faces", "test illustrations", "best guess right", "accuracy", "said unknown", "train s",
                "predict s/image (median)"):  # fmt: skip
        table.add_column(col, justify="right")
    table.add_row(
        str(len(train_items)),
        str(len(test_posts)),
        str(right),
        f"{right / max(1, len(test_posts)):.1%}",
        str(unknown),
        f"{train_s:.0f}",
        f"{sorted(timings)[len(timings) // 2]:.2f}" if timings else "-",
    )
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
