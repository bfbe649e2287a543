"""Face detectors on the real illustrations of the test set, tests/support/testdata.py (no database, no broker)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from core.errors import DetectorUnavailable
from core.images import to_rgb
from core.settings import Settings
from crop.imaging import crop_face
from detect import detectors as detect
from detect.annotate import annotate
from detect.boxes import square_crop_box
from detect.detectors import find_faces, suppress
from tests.support.raw_detections import raw_detections as computed_raw_detections
from tests.support.testdata import raw_image, raw_names

# illustrations in which both detectors find the face a person checked (tests/support/checked_detections.csv)
KNOWN_FACES = ["nishikino_maki/1.png", "sakurauchi_riko/1.jpg", "takimoto_hifumi/1.jpg"]


@pytest.fixture(scope="module")
def settings() -> Settings:
    detect.pin_opencv_threads(1)
    return Settings(_env_file=None)  # the cascade shipped in detect/


@pytest.fixture(scope="module")
def raw_detections(request: pytest.FixtureRequest, settings: Settings) -> dict[str, dict[str, list]]:
    """Both detectors on every raw illustration: about a minute and a half, or read back from pytest's cache
    when neither the detector code, its libraries, its settings nor the pictures changed
    (tests/support/raw_detections.py)."""
    return computed_raw_detections(request.config, settings)


def share_with_face(results: dict, key: str) -> float:
    return sum(1 for r in results.values() if r[key]) / len(results)


def test_detection_rates_match_the_measured_figures(raw_detections: dict) -> None:
    assert len(raw_detections) == len(raw_names()) > 100, "every illustration of the set, each once"
    lbp = share_with_face(raw_detections, "lbpcascade")
    anime = share_with_face(raw_detections, "animeface")
    union = sum(1 for r in raw_detections.values() if suppress(r["animeface"] + r["lbpcascade"])) / len(raw_detections)
    # measured here: 92.5 %, 93.5 %, 100 % (published: about 83 % and 93 %)
    assert 0.88 <= lbp <= 0.97, lbp
    assert 0.89 <= anime <= 0.98, anime
    assert union >= 0.98, union


@pytest.fixture(scope="module")
def checked_faces() -> dict[str, list]:
    """upstream path -> the boxes a person marked as a face in tests/support/checked_detections.csv (no variant)."""
    from tests.support.checked import load

    faces: dict[str, list] = {}
    for row in load():
        if row.variant == "" and row.is_face:
            faces.setdefault(row.file, []).append(row.detection)
    return faces


@pytest.mark.parametrize("name", KNOWN_FACES)
@pytest.mark.parametrize("which", ["animeface", "lbpcascade"])
def test_each_detector_really_finds_faces(settings: Settings, checked_faces: dict, name: str, which: str) -> None:
    """Fails loudly when a library pin breaks a detector silently (Pillow >= 12, OpenCV 5 wheels), or when
    its boxes land somewhere else than the face a person checked."""
    from tests.support.checked import overlap_ratio

    truth = checked_faces[f"raw/{name}"]
    assert len(truth) == 1, f"{name} is a solo picture: one hand-checked face"
    image = to_rgb(Image.open(raw_image(name)))
    found = find_faces(image, which, Settings(_env_file=None, detector_fallbacks=False))
    assert found, f"{which} found no face on {name}: check the Pillow (<12) and OpenCV (4.x) pins"
    # measured IoU with the checked face: animeface 0.78-0.99, the cascade (larger boxes) 0.46-0.68; a box
    # one face-width (or half the picture) away shares nothing with it
    for det in found:
        assert overlap_ratio(det, truth[0]) >= 0.3, f"{which} box {det} on {name} is not the checked face {truth[0]}"


def test_several_faces_yield_several_detections(settings: Settings) -> None:
    left = Image.open(raw_image(KNOWN_FACES[0])).convert("RGB")
    right = Image.open(raw_image(KNOWN_FACES[2])).convert("RGB").resize(left.size)
    both = Image.new("RGB", (left.width * 2, left.height), "white")
    both.paste(left, (0, 0))
    both.paste(right, (left.width, 0))
    found = find_faces(both, "both", settings)
    assert len(found) >= 2
    assert any(d.x + d.w <= left.width for d in found) and any(d.x >= left.width for d in found)


def test_union_keeps_one_box_per_face(raw_detections: dict) -> None:
    """Where both detectors saw the single face of a solo picture, the union must not count it twice."""
    doubled = [
        p
        for p, r in raw_detections.items()
        if len(r["animeface"]) == 1
        and len(r["lbpcascade"]) == 1
        and len(suppress(r["animeface"] + r["lbpcascade"])) != 1
    ]
    agreeing = [p for p, r in raw_detections.items() if len(r["animeface"]) == 1 and len(r["lbpcascade"]) == 1]
    assert len(agreeing) >= 30
    assert len(doubled) <= len(agreeing) * 0.1, doubled


def test_crop_boxes_are_square_and_inside_the_image(raw_detections: dict) -> None:
    checked = 0
    for result in raw_detections.values():
        width, height = result["size"]
        for det in result["animeface"] + result["lbpcascade"]:
            for margin in (0.0, 0.2, 1.0):
                left, top, right, bottom = square_crop_box(det, (width, height), margin)
                assert right - left == bottom - top > 0
                assert left >= 0 and top >= 0 and right <= width and bottom <= height
                checked += 1
    assert checked > 300


def test_crop_and_annotate_make_pictures(settings: Settings) -> None:
    image = Image.open(raw_image(KNOWN_FACES[0])).convert("RGB")
    found = find_faces(image, "both", settings)
    crop = crop_face(image, square_crop_box(found[0], image.size), size=96)
    assert crop.size == (96, 96) and crop.mode == "RGB"
    drawn = annotate(image, found, labels=["maki"] * len(found))
    assert drawn.size == image.size and drawn.tobytes() != image.tobytes()


def test_shipped_cascade_is_checked_against_the_pinned_hash(tmp_path: Path, monkeypatch) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", lbpcascade_path=None)
    assert detect.cascade_path(settings) == detect.SHIPPED_CASCADE
    assert detect.sha256_of(detect.SHIPPED_CASCADE) == detect.LBPCASCADE_SHA256
    assert "The MIT License" in detect.SHIPPED_CASCADE.read_text()[:2000], "the licence header ships with it"

    wrong = tmp_path / "lbpcascade_animeface.xml"
    wrong.write_text("<opencv_storage></opencv_storage>")
    monkeypatch.setattr(detect, "SHIPPED_CASCADE", wrong)
    with pytest.raises(DetectorUnavailable, match="expected 9376d30a"):
        detect.cascade_path(settings)


def test_missing_local_cascade_is_a_clear_error(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, lbpcascade_path=tmp_path / "nope.xml")
    with pytest.raises(DetectorUnavailable, match="WAIFU_LBPCASCADE_PATH"):
        detect.cascade_path(settings)


def test_unknown_detector_is_refused(settings: Settings) -> None:
    with pytest.raises(ValueError, match="unknown detector"):
        find_faces(Image.new("RGB", (10, 10)), "yolo", settings)


def test_reduced_working_copy_reports_boxes_in_the_original_pixels() -> None:
    """WAIFU_DETECTOR_MAX_PIXELS: detection on a smaller copy, boxes mapped back onto the full image."""
    from tests.support.checked import overlap_ratio

    image = to_rgb(Image.open(raw_image(KNOWN_FACES[0])))
    assert detect.work_factor(image, 100_000) < 0.5
    full = find_faces(image, "both", Settings(_env_file=None, detector_max_pixels=0, detector_fallbacks=False))
    reduced = find_faces(image, "both", Settings(_env_file=None, detector_max_pixels=100_000, detector_fallbacks=False))
    assert full and reduced
    assert max(overlap_ratio(a, b) for a in reduced for b in full) >= 0.6, (full, reduced)


def test_small_face_is_found_by_the_cascade_on_an_upscaled_copy() -> None:
    """The fallback for small faces looks at a larger copy of the original, with the cascade only."""
    from tests.support.checked import degraded

    image = degraded(to_rgb(Image.open(raw_image("nishikino_maki/4.jpg"))), "scaled15")
    assert find_faces(image, "both", Settings(_env_file=None, detector_fallbacks=False)) == []
    found = find_faces(image, "both", Settings(_env_file=None))
    assert [d.detector for d in found] == ["lbpcascade@up"]
    assert all(0 <= d.x < image.width and 0 <= d.y < image.height and d.w <= image.width for d in found)
