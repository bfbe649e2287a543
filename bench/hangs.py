"""Hangs per 10,000 animeface calls over every shared-set face crop, before and after the issue 17 fix.

    python -m bench.hangs [--before-calls N] [--after-calls M] [--timeout S]

The crops: every detection the detectors made on the shared set's illustrations (the plain rows of
tests/support/checked_detections.csv: `raw/` and `raw (unrecognized)/`, faces and false detections alike),
cut at the face check's margins 0.25 and 0.5 as `detect.verify.crop_around` does.

Before (the library as it was, `animeface.detect`): its detection stage is deterministic and loops over a
fixed set of windows; the stage that hung is the colour analysis after it (`nv_face_analyze`, k-means with
no epoch cap, from a process-wide random generator). So the bench runs the detection once per crop and
then replays exactly what each `animeface.detect` call runs after it, `nv_face_analyze` on every face found,
through ctypes: each replayed call is a whole `animeface.detect` call minus its deterministic part, drawing
the same random numbers (checked at start: the colours of the first calls equal animeface.detect's). One
child process, like a worker, goes through the crops in turn, the generator's state carrying over; a call
that makes no progress within the timeout counts as a hang, the child is killed and a fresh one goes on
with the next crop.

After (`detect/animeface_boxes.py`): the detection stage alone, each call in a killable child with the same
kind of timeout. It draws no random number and keeps no state, so a call on a crop repeats the same
computation every time: by default one call per crop, and the rate is scaled to 10,000 calls.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HAIR_OFFSET = 40  # bytes: nv_face_feature_t's hair_bgr (after eye_ratio, face_ratio, skin_bgr, skin_ec)
PER_10K = 10_000


def make_crops(folder: Path) -> list[tuple[str, Path]]:
    """(label, PNG file) of every crop, written once into `folder` for the child processes to read."""
    from core.images import open_image
    from detect.verify import MARGINS, crop_around
    from tests.support import checked
    from tests.support.testdata import data_file

    rows = [r for r in checked.load() if r.variant == ""]
    crops, images = [], {}
    for i, row in enumerate(rows):
        if row.file not in images:
            images = {row.file: open_image(data_file(row.file))}  # rows come grouped by file
        for margin in MARGINS:
            path = folder / f"{i:04d}-{margin}.png"
            crop_around(images[row.file], row.detection, margin).save(path)
            d = row.detection
            crops.append((f"{row.file} ({d.x},{d.y},{d.w},{d.h}) margin {margin}", path))
    return crops


# ---------------------------------------------------------------------------- before: the replay ----
class _Analysis:
    """What animeface.detect runs after detecting, on one crop: nv_face_analyze on each face, via ctypes."""

    def __init__(self, path: Path):
        import numpy as np
        from PIL import Image

        from detect import animeface_boxes as boxes

        self.lib = boxes._library()
        self.lib.nv_face_analyze.argtypes = [ctypes.c_void_p, ctypes.c_void_p, boxes._MatrixP]
        with Image.open(path) as image:
            crop = image.convert("RGB")
        self.positions = boxes.positions(crop)
        self.bgr = self.lib.nv_matrix3d_alloc(3, crop.height, crop.width)
        self.lib.nv_matrix_zero(self.bgr)
        boxes._values(self.bgr)[:, :3] = np.asarray(crop, dtype=np.uint8).reshape(-1, 3)[:, ::-1]
        self.feature = ctypes.create_string_buffer(4096)  # nv_face_feature_t is 376 bytes

    def call(self) -> list[tuple[int, int, int]]:
        """One animeface.detect call's analysis; the hair colour (R, G, B) of each face, as animeface reports it."""
        import struct

        hair = []
        for position in self.positions:
            self.lib.nv_face_analyze(self.feature, ctypes.byref(position), self.bgr)
            b, g, r, _ = struct.unpack_from("4f", self.feature.raw, HAIR_OFFSET)
            hair.append((int(r), int(g), int(b)))
        return hair


def replay_colours(path: str, calls: int) -> list:
    analysis = _Analysis(Path(path))
    return [analysis.call() for _ in range(calls)]


def animeface_colours(path: str, calls: int) -> list:
    import animeface
    from PIL import Image

    with Image.open(path) as image:
        crop = image.convert("RGB")
    return [[(f.hair.color.r, f.hair.color.g, f.hair.color.b) for f in animeface.detect(crop)] for _ in range(calls)]


def before_child(listing: Path, start: int, calls: int) -> None:
    """The child: from crop `start` on, `calls` replayed calls each; a line before every call."""
    crops = json.loads(listing.read_text())
    for index in range(start, len(crops)):
        analysis = _Analysis(Path(crops[index]))
        for call in range(calls):
            print(index, call, flush=True)
            analysis.call()
    print("done", flush=True)


def run_before(crops: list[tuple[str, Path]], calls: int, timeout: float) -> tuple[int, list[str]]:
    """(calls made, hangs as 'crop, call n') with the library's own random generator, worker-like."""
    listing = Path(tempfile.mkdtemp(prefix="hangs-")) / "crops.json"
    listing.write_text(json.dumps([str(p) for _, p in crops]))
    made, hangs, start = 0, [], 0  # made: calls started, each either returned or counted as a hang
    while start < len(crops):
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.hangs", "--child-before", str(listing), str(start), str(calls)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        last, wait = None, max(timeout, 120.0)  # the first line waits for the child's imports
        while True:
            ready, _, _ = select.select([child.stdout], [], [], wait)
            if not ready:  # no progress: a hang if a call was under way, else a crop that will not load
                child.kill()
                child.wait()
                if last is None:
                    raise RuntimeError(f"the replay child did not start on crop {start}")
                hangs.append(f"{crops[last[0]][0]}, call {last[1] + 1}")
                start = last[0] + 1
                break
            line = child.stdout.readline()
            if not line or line.startswith("done"):
                if child.wait():
                    raise RuntimeError(f"the replay child failed with exit code {child.returncode}")
                start = len(crops)
                break
            index, call = map(int, line.split())
            made += 1
            last, wait = (index, call), timeout
    return made, hangs


# ----------------------------------------------------------------------------- after: the fix -------
def boxes_of(path: str) -> int:
    from PIL import Image

    from detect import animeface_boxes

    with Image.open(path) as image:
        return len(animeface_boxes.detect(image.convert("RGB")))


def run_after(crops: list[tuple[str, Path]], calls: int, timeout: float) -> tuple[int, list[str]]:
    from detect.killable import Killable, TimedOut

    made, hangs = 0, []
    with Killable(timeout, preload=("detect.animeface_boxes",)) as killable:
        for label, path in crops:
            for call in range(calls):
                made += 1
                try:
                    killable.call(boxes_of, str(path))
                except TimedOut:
                    hangs.append(f"{label}, call {call + 1}")
    return made, hangs


def rate(hangs: int, calls: int) -> str:
    per = hangs / calls * PER_10K if calls else float("nan")
    # with no hang seen, the 95 % upper bound of the rate ("rule of three")
    bound = f", 95 % upper bound {3 / calls * PER_10K:.1f}" if hangs == 0 and calls else ""
    return f"{hangs} hangs in {calls} calls = {per:.1f} per 10,000{bound}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-calls", type=int, default=0, help="replayed calls per crop (0: 10,000 in all)")
    parser.add_argument("--after-calls", type=int, default=1, help="detection-only calls per crop")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds without progress that count a hang")
    parser.add_argument("--child-before", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_before:
        listing, start, calls = args.child_before
        before_child(Path(listing), int(start), int(calls))
        return

    from detect.killable import Killable

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hang-crops-") as folder:
        crops = make_crops(Path(folder))
        print(f"{len(crops)} crops (shared set, margins 0.25 and 0.5)", flush=True)
        # the replay draws what animeface.detect draws: same colours, call after call, from a fresh generator
        with Killable(600) as one, Killable(600) as other:
            real = one.call(animeface_colours, str(crops[0][1]), 20)
            same = any(real) and real == other.call(replay_colours, str(crops[0][1]), 20)
        print(f"replay equals animeface.detect on the first 20 calls of the first crop: {same}", flush=True)
        if not same:
            raise SystemExit("the replay does not match animeface.detect: the before figure would be wrong")
        per_crop = args.before_calls or math.ceil(PER_10K / len(crops))
        made, hangs = run_before(crops, per_crop, args.timeout)
        print(f"before (animeface.detect, {per_crop} calls per crop): {rate(len(hangs), made)}", flush=True)
        for hang in hangs:
            print(f"  hang: {hang}", flush=True)
        made_after, hangs_after = run_after(crops, args.after_calls, max(args.timeout, 60.0))
        print(
            f"after (detection stage only, {args.after_calls} call(s) per crop): {rate(len(hangs_after), made_after)}",
            flush=True,
        )
        for hang in hangs_after:
            print(f"  hang: {hang}", flush=True)
    print(f"run time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
