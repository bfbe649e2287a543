"""Both detectors on every raw illustration of the test set (tests/test_detect.py's detection-rate tests).

The two detectors run in two threads: each holds its own lock and releases the GIL inside its C code, so the
run takes the slower detector's time instead of the sum. The result is kept in pytest's cache
(`.pytest_cache`) under a key of everything it depends on: the files of `detect/` (code and cascade) and
`core/images.py`, the animeface library file, the versions of animeface, OpenCV, Pillow and NumPy, the
settings (but the broker, database and data dir), and the illustrations' sha256s. Any change to one of
them computes it again, as does `pytest --cache-clear`; the illustrations are read and checked against their
sha256s on every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from core.images import to_rgb
from core.settings import Settings
from detect.detectors import Detection, detect_animeface, detect_lbpcascade
from tests.support.env import PROJECT_ROOT
from tests.support.testdata import raw_images, raw_names, registry

CACHE_NAME = "waifu/raw-detections"
DISTRIBUTIONS = ("animeface", "opencv-python-headless", "pillow", "numpy")


def cache_key(settings: Settings) -> str:
    import animeface

    digest = hashlib.sha256()
    files = sorted(p for p in (PROJECT_ROOT / "detect").iterdir() if p.is_file())
    files += [PROJECT_ROOT / "core" / "images.py", *sorted(Path(animeface.__file__).parent.glob("*.so"))]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for name in DISTRIBUTIONS:
        digest.update(f"{name}={importlib.metadata.version(name)}\0".encode())
    # every setting but where the run's services and files are: the broker differs per pytest-xdist worker, and
    # with it in the key the result was computed again whenever the file went to another worker
    digest.update(settings.model_dump_json(exclude={"broker_url", "database_url", "data_dir"}).encode())
    for name in raw_names():
        digest.update(f"{name}={registry()[name]}\0".encode())
    return digest.hexdigest()


def _detect_all(images: list[Path], settings: Settings) -> dict[str, dict]:
    def each(detector: Callable[[Image.Image], list[Detection]]) -> list[list[Detection]]:
        return [detector(to_rgb(Image.open(path))) for path in images]

    with ThreadPoolExecutor(2) as pool:
        anime = pool.submit(each, detect_animeface)
        lbp = pool.submit(each, lambda image: detect_lbpcascade(image, settings))
        return {
            name: {"animeface": a, "lbpcascade": b, "size": list(Image.open(path).size)}
            for name, path, a, b in zip(raw_names(), images, anime.result(), lbp.result(), strict=True)
        }


def raw_detections(config: pytest.Config, settings: Settings) -> dict[str, dict]:
    """str(file) -> {"animeface": [...], "lbpcascade": [...], "size": (w, h)} for every raw illustration."""
    images = [path for _tag, path in raw_images()]  # read and checked even when the result is cached
    key = cache_key(settings)
    cache = getattr(config, "cache", None)  # None with `-p no:cacheprovider`
    cached = cache.get(CACHE_NAME, None) if cache is not None else None
    if cached and cached.get("key") == key:
        by_name = {
            name: {
                "animeface": [Detection(**d) for d in r["animeface"]],
                "lbpcascade": [Detection(**d) for d in r["lbpcascade"]],
                "size": list(r["size"]),
            }
            for name, r in cached["detections"].items()
        }
    else:
        by_name = _detect_all(images, settings)
        if cache is not None:
            plain = {
                name: {k: [dataclasses.asdict(d) for d in v] if k != "size" else v for k, v in r.items()}
                for name, r in by_name.items()
            }
            cache.set(CACHE_NAME, {"key": key, "detections": plain})
    return {
        str(path): {**by_name[name], "size": tuple(by_name[name]["size"])}
        for name, path in zip(raw_names(), images, strict=True)
    }
