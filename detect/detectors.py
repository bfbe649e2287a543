"""Anime face detectors behind one interface: `animeface` (nagadomi's animeface-2009 via the PyPI
package), `lbpcascade` (OpenCV's CascadeClassifier with lbpcascade_animeface.xml), and `both` (their
union with non-maximum suppression).

Design notes: docs/architecture.md, `detect/detectors.py`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from core.errors import DetectorUnavailable
from core.logs import kv
from core.settings import Settings, get_settings

log = logging.getLogger("waifu.detect")

# nagadomi's lbpcascade_animeface.xml (MIT licence, header in the file), shipped as package data; upstream:
# https://raw.githubusercontent.com/nagadomi/lbpcascade_animeface/master/lbpcascade_animeface.xml
SHIPPED_CASCADE = Path(__file__).with_name("lbpcascade_animeface.xml")
LBPCASCADE_SHA256 = "9376d30ac38db6bda2a68b88b3b76bbd7e6aa33af47f7f5c76bc88ca75f1ce30"
DETECTORS = ("animeface", "lbpcascade", "both")

_lock = threading.Lock()
_cascades: dict[str, object] = {}
_verified: set[Path] = set()


@dataclass(frozen=True)
class Detection:
    x: int
    y: int
    w: int
    h: int
    detector: str
    score: float | None = None  # animeface: likelihood 0..1; lbpcascade: neighbour count

    @classmethod
    def from_box(cls, box: Sequence[int], detector: str) -> Detection:
        """From a stored or reported (x, y, w, h) box."""
        x, y, w, h = box
        return cls(x, y, w, h, detector)

    @property
    def area(self) -> int:
        return self.w * self.h


def pin_opencv_threads(threads: int = 1) -> None:
    """N prefork processes should use N cores, not N times all of them."""
    import cv2

    cv2.setNumThreads(threads)


# ------------------------------------------------------------------------ lbpcascade ----------
def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cascade_path(settings: Settings) -> Path:
    """The configured copy (WAIFU_LBPCASCADE_PATH), else the one shipped in this package, checked against
    its pinned hash: detection never depends on a third party being up."""
    if settings.lbpcascade_path:
        path = Path(settings.lbpcascade_path)
        if not path.is_file():
            raise DetectorUnavailable(f"WAIFU_LBPCASCADE_PATH={path} does not exist")
        return path
    if SHIPPED_CASCADE not in _verified:
        if not SHIPPED_CASCADE.is_file():
            raise DetectorUnavailable(
                f"the shipped cascade {SHIPPED_CASCADE} is missing: reinstall waifu, "
                f"or set WAIFU_LBPCASCADE_PATH to a copy of lbpcascade_animeface.xml"
            )
        digest = sha256_of(SHIPPED_CASCADE)
        if digest != LBPCASCADE_SHA256:
            raise DetectorUnavailable(
                f"the shipped cascade {SHIPPED_CASCADE} has sha256 {digest}, expected "
                f"{LBPCASCADE_SHA256}: refused (reinstall, or set WAIFU_LBPCASCADE_PATH)"
            )
        _verified.add(SHIPPED_CASCADE)
    return SHIPPED_CASCADE


def load_cascade(path: Path):
    import cv2

    if not hasattr(cv2, "CascadeClassifier"):
        raise DetectorUnavailable("this OpenCV build has no CascadeClassifier (OpenCV 5 wheels): install opencv 4.x")
    key = str(path)
    with _lock:
        if key not in _cascades:
            cascade = cv2.CascadeClassifier(key)
            if cascade.empty():
                raise DetectorUnavailable(f"OpenCV could not load the cascade {path}")
            _cascades[key] = cascade
        return _cascades[key]


def detect_lbpcascade(
    image: Image.Image,
    settings: Settings | None = None,
    scale_factor: float = 1.1,
    min_neighbors: int = 5,
    min_size: int = 24,
) -> list[Detection]:
    import cv2
    import numpy as np

    cascade = load_cascade(cascade_path(settings or get_settings()))
    gray = cv2.equalizeHist(cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY))
    boxes, neighbours = cascade.detectMultiScale2(
        gray, scaleFactor=scale_factor, minNeighbors=min_neighbors, minSize=(min_size, min_size)
    )
    return [
        Detection(int(x), int(y), int(w), int(h), "lbpcascade", float(n))
        for (x, y, w, h), n in zip(boxes, neighbours, strict=False)
    ]


# ------------------------------------------------------------------------ animeface -----------
def detect_animeface(image: Image.Image, min_likelihood: float = 0.0) -> list[Detection]:
    """animeface's boxes and likelihoods, without its colour analysis (which can loop forever, issue 17)."""
    from detect import animeface_boxes

    return [
        Detection(face.x, face.y, face.width, face.height, "animeface", face.likelihood)
        for face in animeface_boxes.detect(image.convert("RGB"))
        if face.likelihood >= min_likelihood
    ]


# ------------------------------------------------------------------------ union ---------------
def overlap(a: Detection, b: Detection) -> float:
    """Intersection over the smaller box: the two detectors frame the same face differently."""
    ix = max(0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    smaller = min(a.area, b.area)
    return (ix * iy) / smaller if smaller else 0.0


def suppress(detections: list[Detection], threshold: float = 0.4) -> list[Detection]:
    """Non-maximum suppression; animeface (which scores likelihood) wins over the cascade, then larger boxes."""
    ranked = sorted(detections, key=lambda d: (d.detector != "animeface", -(d.score or 0), -d.area))
    kept: list[Detection] = []
    for det in ranked:
        if all(overlap(det, k) < threshold for k in kept):
            kept.append(det)
    return sorted(kept, key=lambda d: (d.y, d.x))


def single_pass(image: Image.Image, detector: str, settings: Settings) -> list[Detection]:
    found: list[Detection] = []
    if detector in ("animeface", "both"):
        found += detect_animeface(image)
    if detector in ("lbpcascade", "both"):
        found += detect_lbpcascade(image, settings)
    return suppress(found) if detector == "both" else found


def resized(image: Image.Image, factor: float) -> Image.Image:
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    # BILINEAR widens its support when shrinking (no aliasing), and is several times cheaper than LANCZOS
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def scaled(d: Detection, factor: float) -> Detection:
    """A box found in a copy resized by `factor`, in the pixels of the image it was resized from."""
    if factor == 1:
        return d
    return Detection(
        round(d.x / factor),
        round(d.y / factor),
        max(1, round(d.w / factor)),
        max(1, round(d.h / factor)),
        d.detector,
        d.score,
    )


def work_factor(image: Image.Image, max_pixels: int) -> float:
    """Detectors scan every window size from ~24 px up, so their time grows with the pixel count while
    faces in illustrations are large: a copy of at most `max_pixels` loses almost none (bench/faces.py)."""
    pixels = image.width * image.height
    return 1.0 if not max_pixels or pixels <= max_pixels else (max_pixels / pixels) ** 0.5


def upscaled_pass(image: Image.Image, detector: str, settings: Settings, factor: float) -> list[Detection]:
    """Small faces (full-body pictures) fall under the detectors' minimum size: look again, larger.
    `factor` is relative to `image` (the original); 1 or less just looks at more of its pixels."""
    copy = (
        image
        if factor == 1
        else resized(image, factor)
        if factor < 1
        else image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.LANCZOS)
    )
    return [replace(scaled(d, factor), detector=f"{d.detector}@up") for d in single_pass(copy, detector, settings)]


def rotated_pass(image: Image.Image, detector: str, settings: Settings, angle: float) -> list[Detection]:
    """Tilted heads: detect on a rotated copy, map each box's centre back into the original."""
    import math

    rotated = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(255, 255, 255))
    rad = math.radians(angle)
    cos, sin = math.cos(rad), math.sin(rad)
    out = []
    for d in single_pass(rotated, detector, settings):
        # PIL rotates counter-clockwise about the centre; invert that for the box centre
        cx, cy = d.x + d.w / 2 - rotated.width / 2, d.y + d.h / 2 - rotated.height / 2
        ox = cos * cx - sin * cy + image.width / 2
        oy = sin * cx + cos * cy + image.height / 2
        side = max(d.w, d.h)
        x, y = round(ox - side / 2), round(oy - side / 2)
        x, y = max(0, min(x, image.width - 1)), max(0, min(y, image.height - 1))
        w, h = min(side, image.width - x), min(side, image.height - y)
        if w > 0 and h > 0:
            out.append(Detection(x, y, w, h, f"{d.detector}@rot{angle:+.0f}", d.score))
    return out


def fallback_passes(
    image: Image.Image, work: Image.Image, factor: float, detector: str, settings: Settings
) -> list[Callable[[], list[Detection]]]:
    """The passes tried in turn when the first finds nothing, each returning boxes in `image`'s pixels.

    Small faces: a copy `detector_upscale` times the working copy, made from the original. Tilted heads:
    the working copy rotated by each of `detector_angles`. With `both` on a working copy, the cheap cascade
    looks at the large copy first (it finds small faces where animeface does not, at a third of the cost),
    and animeface only last, once nothing else found a face. WAIFU_DETECTOR_MAX_PIXELS=0 keeps the
    full-size path of before: both detectors on the large copy, then the rotations.
    """
    large = factor * settings.detector_upscale
    split = detector == "both" and settings.detector_max_pixels > 0

    def rotated(angle: float) -> Callable[[], list[Detection]]:
        return lambda: [scaled(d, factor) for d in rotated_pass(work, detector, settings, angle)]

    passes: list[Callable[[], list[Detection]]] = [
        lambda: upscaled_pass(image, "lbpcascade" if split else detector, settings, large)
    ]
    passes += [rotated(a) for a in settings.detector_angles]
    if split:
        passes.append(lambda: upscaled_pass(image, "animeface", settings, large))
    return passes


def find_faces(image: Image.Image, detector: str = "both", settings: Settings | None = None) -> list[Detection]:
    """Every face in `image`, in its own pixel coordinates.

    The detectors run on a working copy of at most WAIFU_DETECTOR_MAX_PIXELS (0: the full image): their
    time grows with the pixel count, and faces in illustrations are large. When that pass finds nothing,
    fallback passes run (cost only on misses, see `fallback_passes`): a larger copy for small faces, then
    rotated copies for tilted heads. WAIFU_DETECTOR_FALLBACKS=false turns them off.
    """
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}")
    settings = settings or get_settings()
    image = image.convert("RGB")
    factor = work_factor(image, settings.detector_max_pixels)
    work = image if factor == 1 else resized(image, factor)
    result = [scaled(d, factor) for d in single_pass(work, detector, settings)]
    if not result and settings.detector_fallbacks:
        for attempt in fallback_passes(image, work, factor, detector, settings):
            result = attempt()
            if result:
                break
    log.debug(kv("detected", detector=detector, faces=len(result)))
    return result
