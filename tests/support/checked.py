"""The hand-checked detections (checked_detections.csv): every box the detectors produced on the
transfer-learning-anime illustrations (`raw/` and `raw (unrecognized)/`) and on two degraded copies of
`raw/`, each looked at by a person and marked face / not a face. Data only (no images): a row names its
illustration by its upstream path, and the degraded copies are rebuilt from the original by `degraded`.
Used by bench/faces.py (precision and recall of the face check, fitting its weights) and the tests.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from detect.detectors import Detection

CHECKED_CSV = Path(__file__).with_name("checked_detections.csv")
COLUMNS = ("file", "variant", "x", "y", "w", "h", "detector", "score", "is_face", "note")
# the degraded copies bench/faces.py measures: small faces, tilted heads
VARIANTS = ("", "scaled15", "rot35")


@dataclass(frozen=True)
class Checked:
    file: str  # upstream path, e.g. "raw/nishikino_maki/1.png"
    variant: str  # "" (the illustration itself), "scaled15" or "rot35"
    detection: Detection  # in the pixels of that variant
    is_face: bool
    note: str  # what a false detection shows

    @property
    def character(self) -> str:
        return self.file.split("/")[1]


def degraded(image: Image.Image, variant: str) -> Image.Image:
    """The illustration as the variant shows it: scaled to 15 % of each side, or rotated 35 degrees."""
    if variant == "":
        return image
    if variant == "scaled15":
        return image.resize(
            (max(1, round(image.width * 0.15)), max(1, round(image.height * 0.15))), Image.Resampling.LANCZOS
        )
    if variant == "rot35":
        return image.rotate(35, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(255, 255, 255))
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")


def load(path: Path = CHECKED_CSV) -> list[Checked]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [
            Checked(
                row["file"],
                row["variant"],
                Detection(
                    int(row["x"]),
                    int(row["y"]),
                    int(row["w"]),
                    int(row["h"]),
                    row["detector"],
                    float(row["score"]) if row["score"] else None,
                ),
                row["is_face"] == "1",
                row["note"],
            )
            for row in csv.DictReader(fh)
        ]


def save(rows: list[Checked], path: Path = CHECKED_CSV) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in sorted(rows, key=lambda r: (r.variant, r.file, r.detection.y, r.detection.x)):
            d = r.detection
            writer.writerow(
                [
                    r.file,
                    r.variant,
                    d.x,
                    d.y,
                    d.w,
                    d.h,
                    d.detector,
                    "" if d.score is None else f"{d.score:.4f}",
                    int(r.is_face),
                    r.note,
                ]
            )


def overlap_ratio(a: Detection, b: Detection) -> float:
    """Intersection over union: two boxes of one face from two runs agree well above 0.5."""
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    union = a.area + b.area - ix * iy
    return ix * iy / union if union else 0.0


def match(rows: list[Checked], file: str, variant: str, det: Detection, min_iou: float = 0.5) -> Checked | None:
    """The checked row that stands for `det` (same file and variant, boxes overlapping), if any."""
    best = max(
        (r for r in rows if r.file == file and r.variant == variant),
        key=lambda r: overlap_ratio(r.detection, det),
        default=None,
    )
    return best if best is not None and overlap_ratio(best.detection, det) >= min_iou else None
