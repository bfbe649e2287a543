"""Issue 17: animeface's colour k-means could loop forever inside the face check. The detectors now use
animeface's detection stage alone (detect/animeface_boxes.py), and `waifu detect`/`waifu predict` bound
each image's detection in a killable child (detect/killable.py, WAIFU_IMAGE_TIME_LIMIT_S)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image

from core.images import open_image
from detect import animeface_boxes
from detect.detectors import Detection
from detect.killable import ChildDied, Killable, TimedOut
from detect.verify import MARGINS, crop_around
from tests.support.cli import json_lines, run_cli_blocking
from tests.support.env import PROJECT_ROOT
from tests.support.testdata import raw_image

REPRODUCER = ("sakurauchi_riko/12.png", Detection(211, 145, 106, 106, "animeface", 1.0))
# full illustrations (at a quarter of their side, to keep animeface quick) and the reproducer's crops
COMPARED = ["nishikino_maki/1.png", "sakurauchi_riko/12.png", "takimoto_hifumi/3.jpg", "sakurauchi_riko/18.png"]


def _animeface_faces(image: Image.Image) -> list[tuple]:
    import animeface

    return [
        (f.face.pos.x, f.face.pos.y, f.face.pos.width, f.face.pos.height, f.likelihood) for f in animeface.detect(image)
    ]


def test_boxes_are_animeface_detects_boxes_and_likelihoods() -> None:
    """The detection stage alone reports exactly what animeface.detect reports for box and likelihood."""
    images = []
    for name in COMPARED:
        image = open_image(raw_image(name))
        images.append(image.resize((image.width // 2, image.height // 2)))
    name, det = REPRODUCER
    images += [crop_around(open_image(raw_image(name)), det, margin) for margin in MARGINS]
    found = 0
    for image in images + [images[0].convert("L")]:
        ours = [(f.x, f.y, f.width, f.height, f.likelihood) for f in animeface_boxes.detect(image)]
        assert ours == _animeface_faces(image)
        found += len(ours)
    assert found >= len(images)  # faces were found, not two empty lists compared


def test_face_check_never_runs_the_colour_analysis_on_the_reproducer() -> None:
    """150 animeface calls on the reproducer's crops (the issue saw call 146 hang), in a fresh process
    bounded by a timeout; no random number is drawn, so the k-means that looped is never entered."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "tests.support.face_check_calls", "75"],
            cwd=PROJECT_ROOT,
            env=os.environ,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the face check did not return on the issue 17 reproducer")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["calls"] == 75
    assert report["drawn"] is False, "animeface's colour analysis (nv_face_analyze) ran"
    assert report["last"]["animeface_near"] > 0.9  # the face was still judged by animeface


def test_killable_ends_a_call_that_overruns_and_goes_on() -> None:
    with Killable(2.0) as killable:
        first = killable.call(os.getpid)
        assert first != os.getpid()
        with pytest.raises(TimedOut, match="did not finish within 2 s"):
            killable.call(time.sleep, 3600)  # returns at once with the error: the sleeping child was killed
        second = killable.call(os.getpid)
        assert second != first  # a fresh child took over
        with pytest.raises(ChildDied, match="exit code 3"):
            killable.call(os._exit, 3)
        with pytest.raises(ValueError, match="invalid literal"):
            killable.call(int, "not a number")  # an exception in the child is raised here, not swallowed
        assert killable.call(os.getpid) not in (first, second)


def test_detect_reports_the_stalled_image_and_goes_on(tmp_path) -> None:
    """A batch with an image whose detection never returns (the test hook): that file gets the sentence,
    the files before and after it get their faces, and the command ends (else the run's timeout fails it)."""
    stalled = tmp_path / "stalls.png"
    shutil.copy(raw_image("takimoto_hifumi/3.jpg"), stalled)
    paths = [raw_image("nishikino_maki/1.png"), stalled, raw_image("sakurauchi_riko/12.png"), stalled]
    env = {
        "WAIFU_DATA_DIR": str(tmp_path / "data"),
        "WAIFU_DETECTOR": "both",
        # each real image takes well under a second (both detectors); 5 s leaves room for a loaded machine
        "WAIFU_IMAGE_TIME_LIMIT_S": "5",
        "WAIFU_TEST_STALL_FILE": stalled.name,
    }
    result = run_cli_blocking(env, "detect", "--json", *paths, timeout=900)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    entries = json_lines(result)
    assert [e["path"] for e in entries] == [str(p) for p in paths]
    for entry in entries:
        if entry["path"] == str(stalled):
            assert entry["error"] == "face detection did not finish within 5 s", entry
        else:
            assert "error" not in entry and entry["faces"], entry
