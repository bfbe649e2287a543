"""The face check: is a detection really a face?

Design notes: docs/architecture.md, `detect/verify.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from PIL import Image

from core.settings import Settings, get_settings
from detect import animeface_boxes
from detect.detectors import Detection, cascade_path, load_cascade

CHECK_SIDE = 160  # pixels of the normalised crop: faces of every size are judged at one scale
MARGINS = (0.25, 0.5)  # context around the box, share of its side, each side
# fitted by `python -m bench.faces --fit-check` on tests/support/checked_detections.csv (all rows)
WEIGHTS = {
    "cascade_near": 1.31,
    "cascade_wide": 2.27,
    "animeface_near": 1.63,
    "animeface_wide": 1.65,
    "likelihood": 0.74,
    "skin": 2.61,
}
BIAS = -4.40
THRESHOLD = 0.5  # probability of a face below which a detection is filtered
_ROTATION = re.compile(r"@rot([+-]?\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Verdict:
    face: bool
    probability: float
    reason: str  # why it is not a face ("" for a face)


def rotation_of(det: Detection) -> float:
    """The angle of the rotated pass that found `det` (0 for a plain pass): the crop is turned back by it."""
    found = _ROTATION.search(det.detector)
    return float(found.group(1)) if found else 0.0


def crop_around(image: Image.Image, det: Detection, margin: float, angle: float = 0.0) -> Image.Image:
    """The box with `margin` of its side around it (black beyond the image), upright, CHECK_SIDE square."""
    extra = max(det.w, det.h) * margin
    crop = image.crop((int(det.x - extra), int(det.y - extra), int(det.x + det.w + extra), int(det.y + det.h + extra)))
    if angle:
        crop = crop.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255))
    return crop.resize((CHECK_SIDE, CHECK_SIDE), Image.Resampling.BILINEAR)


def _central(x: float, y: float, w: float, h: float, margin: float) -> bool:
    """A box found on the crop stands for the detection if it sits in the middle and is about its size."""
    inner = CHECK_SIDE / (1 + 2 * margin)
    centre_x, centre_y = x + w / 2 - CHECK_SIDE / 2, y + h / 2 - CHECK_SIDE / 2
    return abs(centre_x) < inner / 3 and abs(centre_y) < inner / 3 and 0.5 < w / inner < 2


def skin_share(image: Image.Image, det: Detection) -> float:
    """Share of light, warm, moderately saturated pixels in the middle of the box (cheeks, nose, chin)."""
    import numpy as np

    middle = image.crop((det.x + det.w // 4, det.y + det.h // 3, det.x + 3 * det.w // 4, det.y + 5 * det.h // 6))
    hsv = np.asarray(middle.convert("HSV")).reshape(-1, 3).astype(int)
    if not len(hsv):
        return 0.0
    hue, sat, val = hsv[:, 0], hsv[:, 1], hsv[:, 2]  # Pillow's HSV: all three 0..255
    return float(np.mean(((hue < 36) | (hue > 240)) & (sat > 8) & (sat < 120) & (val > 140)))


def features(image: Image.Image, det: Detection, settings: Settings | None = None) -> dict[str, float]:
    import cv2
    import numpy as np

    cascade = load_cascade(cascade_path(settings or get_settings()))
    angle = rotation_of(det)
    out: dict[str, float] = {}
    for margin, name in zip(MARGINS, ("near", "wide"), strict=True):
        crop = crop_around(image, det, margin, angle)
        # boxes and likelihoods only: animeface's colour analysis can loop forever (issue 17)
        liked = [f.likelihood for f in animeface_boxes.detect(crop) if _central(f.x, f.y, f.width, f.height, margin)]
        gray = cv2.equalizeHist(cv2.cvtColor(np.asarray(crop), cv2.COLOR_RGB2GRAY))
        boxes, neighbours = cascade.detectMultiScale2(
            gray, scaleFactor=1.1, minNeighbors=1, minSize=(CHECK_SIDE // 5, CHECK_SIDE // 5)
        )
        agreeing = [int(n) for (x, y, w, h), n in zip(boxes, neighbours, strict=False) if _central(x, y, w, h, margin)]
        out[f"cascade_{name}"] = min(max(agreeing, default=0), 20) / 10  # saturates: 20 windows is certain
        out[f"animeface_{name}"] = max(liked, default=0.0)
    out["likelihood"] = (det.score or 0.0) if det.detector.startswith("animeface") else 0.0
    out["skin"] = skin_share(image, det)
    return out


def probability(values: dict[str, float]) -> float:
    z = BIAS + sum(WEIGHTS[name] * values[name] for name in WEIGHTS)
    return 1 / (1 + math.exp(-z))


def explain(values: dict[str, float]) -> str:
    return (
        f"cascade {round(values['cascade_near'] * 10)}/{round(values['cascade_wide'] * 10)} windows, "
        f"animeface {values['animeface_near']:.2f}/{values['animeface_wide']:.2f} on the crop, "
        f"detector likelihood {values['likelihood']:.2f}, skin {values['skin']:.0%}"
    )


def check(image: Image.Image, det: Detection, settings: Settings | None = None) -> Verdict:
    values = features(image, det, settings)
    p = probability(values)
    if p >= THRESHOLD:
        return Verdict(True, p, "")
    return Verdict(False, p, f"not a face (face check {p:.2f} < {THRESHOLD}): {explain(values)}")


def check_faces(image: Image.Image, detections: list[Detection], settings: Settings | None = None) -> list[Verdict]:
    """One verdict per detection, in order; `image` is the one the boxes refer to."""
    image = image.convert("RGB")
    return [check(image, det, settings) for det in detections]
