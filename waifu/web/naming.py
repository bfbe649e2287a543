"""Naming the faces of one picture for the "Who is this?" page and the API, with predict/ (the code behind
`waifu predict`): detect, crop, rank the classes.

Design notes: docs/architecture.md, `waifu/web/naming.py`.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from core.errors import Refused
from core.images import open_image
from core.logs import kv
from core.settings import Settings
from db.models import pk

log = logging.getLogger("waifu.web")

MAX_WAITING = 4  # requests queued behind the running prediction before "busy"


class NoModel(LookupError):
    """No current model yet: the message says how to get one."""


class Busy(RuntimeError):
    """The prediction did not finish (or start) in time; `retry_after` seconds is a fair wait."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Named:
    """A picture's faces as predict.classify names them, and the model version that answered."""

    model: str  # "v7"
    image: Image.Image = field(repr=False)
    faces: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "width": self.image.width, "height": self.image.height, "faces": self.faces}


class Namer:
    def __init__(self, settings: Settings, timeout: float | None = None, max_waiting: int = MAX_WAITING) -> None:
        self.settings = settings
        self.timeout = settings.web_predict_timeout_s if timeout is None else timeout
        self.max_waiting = max_waiting
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="waifu-predict")
        self._lock = threading.Lock()
        self._waiting = 0
        self._loaded: tuple[int, Any] | None = None  # (model version id, classifier)
        self._detector: Any = None  # detect.bounded.BoundedDetector, started with the first picture
        self.loads = 0  # how many times a model was loaded (tests, benchmarks: once per version)

    def name(self, data: bytes, k: int = 3) -> Named:
        """The faces of the picture in `data` (its file's bytes), each with its `k` likeliest names. Raises
        core.errors.Refused for anything that is not a readable image under the pixel cap, NoModel, or Busy."""
        image = open_image(data, self.settings.max_image_pixels)
        with self._lock:
            if self._waiting >= self.max_waiting + 1:
                raise Busy(f"{self._waiting} pictures are being named already: try again in a few seconds", 5)
            self._waiting += 1
        started = time.monotonic()
        try:
            future = self._executor.submit(self._classify, image, k)
            try:
                model, faces = future.result(timeout=self.timeout)
            except (FutureTimeout, CancelledError):
                future.cancel()  # not started yet: it never will
                log.warning(kv("naming a picture timed out", seconds=self.timeout, pixels=image.width * image.height))
                raise Busy(
                    f"naming the faces took longer than {self.timeout:.0f} s (WAIFU_WEB_PREDICT_TIMEOUT_S): "
                    "the server is busy, try again shortly",
                    max(1.0, self.timeout),
                ) from None
        finally:
            with self._lock:
                self._waiting -= 1
        log.info(kv("picture named", model=model, faces=len(faces), seconds=round(time.monotonic() - started, 2)))
        return Named(model, image, faces)

    def _classify(self, image: Image.Image, k: int) -> tuple[str, list[dict[str, Any]]]:
        from detect.bounded import BoundedDetector
        from predict.classify import classify_image

        version_id, classifier = self._current()
        if self._detector is None:  # third-party C code can hang: detection runs in a child it can kill
            self._detector = BoundedDetector(self.settings)
        detections = self._find(image)
        return f"v{version_id}", classify_image(classifier, image, self.settings, k=k, detections=detections)

    def _find(self, image: Image.Image) -> list:
        from detect.bounded import DetectionFailed

        try:
            return self._detector.find(image, self.settings.detector, "upload")
        except DetectionFailed as exc:  # this picture only: the next one gets a fresh child
            raise Refused(f"{exc} (WAIFU_IMAGE_TIME_LIMIT_S)") from exc

    def _current(self) -> tuple[int, Any]:
        """The current model, loaded again only when another version became current (runs in the one
        prediction thread: no two loads at once)."""
        from db.engine import session_scope
        from detect.detectors import pin_opencv_threads
        from predict.classify import load_version
        from train.registry import current_version

        with session_scope(readonly=True) as session:
            version = current_version(session)
        if version is None or not version.artifact_dir:
            raise NoModel("no model has been trained yet: retrain on the Models page (or `waifu retrain --wait`)")
        if self._loaded is None or self._loaded[0] != version.id:
            pin_opencv_threads()  # as `waifu predict`: detection on one core, TensorFlow takes the others
            self._loaded = (pk(version), load_version(version, self.settings))
            self.loads += 1
            log.info(kv("model loaded for the web page", version=f"v{version.id}"))
        return self._loaded

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._detector is not None:
            self._detector.__exit__(None, None, None)
