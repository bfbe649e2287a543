"""One image's face detection with a time limit, for `waifu detect` and `waifu predict`.

The detectors run third-party C code (animeface, OpenCV) that cannot be interrupted, and a batch must not
wait forever on one picture (issue 17). `BoundedDetector.find` runs `find_faces` in a killable child
(detect/killable.py) for at most WAIFU_IMAGE_TIME_LIMIT_S; on overrun the child is killed and a fresh one
takes the next image, and the caller gets `DetectionFailed` with a sentence for that image's `error`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from PIL import Image

from core.logs import kv
from core.settings import Settings, get_settings
from detect.detectors import Detection, find_faces, pin_opencv_threads
from detect.killable import ChildDied, Killable, TimedOut

log = logging.getLogger("waifu.detect")


class DetectionFailed(RuntimeError):
    """The face detection of one image overran its limit or ended its process; str() is the sentence."""


def faces_in(image: Image.Image, detector: str, name: str) -> list[Detection]:
    """Runs in the child: the faces of `image` (file `name` matters to the test hook only)."""
    settings = get_settings()
    if settings.test_stall_file and Path(name).name == settings.test_stall_file:
        while True:  # the test hook: a detection that never returns, as animeface's k-means once did
            time.sleep(3600)
    pin_opencv_threads()
    return find_faces(image, detector, settings)


class BoundedDetector:
    """`with BoundedDetector(settings) as d: d.find(image, detector, path)`; one child serves the whole batch."""

    def __init__(self, settings: Settings | None = None):
        self.time_limit_s = (settings or get_settings()).image_time_limit_s
        self._killable = Killable(self.time_limit_s, preload=(__name__,))

    def __enter__(self) -> BoundedDetector:
        return self

    def __exit__(self, *exc_info) -> None:
        self._killable.close()

    def find(self, image: Image.Image, detector: str, name: str) -> list[Detection]:
        try:
            return self._killable.call(faces_in, image, detector, name)
        except TimedOut as exc:
            log.warning(kv("face detection timed out", file=name, limit_s=exc.seconds))
            raise DetectionFailed(f"face detection did not finish within {exc.seconds:g} s") from exc
        except ChildDied as exc:
            log.warning(kv("face detection ended its process", file=name, exitcode=exc.exitcode))
            raise DetectionFailed(f"face detection {exc}") from exc
