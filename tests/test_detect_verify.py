"""The face check (detect/verify.py) on real illustrations and their hand-checked detections
(tests/support/checked_detections.csv), and the detect step keeping filtered detections with their reason,
on SQLite and PostgreSQL."""

from __future__ import annotations

from collections import Counter

import pytest
from sqlmodel import select

from core.images import open_image
from core.settings import Settings, get_settings, reset_settings_cache
from db.engine import session_scope
from db.models import Face, FaceState, LabelSource, PostState
from detect.detectors import Detection
from detect.step import detect_post
from detect.verify import THRESHOLD, check, check_faces, features, probability, rotation_of
from scraper.characters import add_characters
from tests.support import checked
from tests.support.pipeline import post_row, run_pipeline, store_post
from tests.support.testdata import data_file, registry

# hand-checked false detections of the default pipeline (checked_detections.csv) and the face of each picture
FALSE = {
    "raw/sakurauchi_riko/6.jpg": "dress ribbon",
    "raw/sakurauchi_riko/18.png": "sailor collar and skirt",
    "raw/takimoto_hifumi/12.jpg": "hand in hair",
}


@pytest.fixture(scope="module")
def rows() -> list[checked.Checked]:
    return checked.load()


def row_for(rows: list[checked.Checked], file: str, note: str = "", is_face: bool = False) -> checked.Checked:
    return next(
        r for r in rows if r.file == file and r.variant == "" and r.is_face == is_face and (is_face or r.note == note)
    )


def test_checked_list_is_data_about_the_test_set(rows: list[checked.Checked]) -> None:
    assert len(rows) >= 350
    assert {r.variant for r in rows} == set(checked.VARIANTS)
    assert all(r.file in registry() for r in rows), (
        "every row names an illustration of tests/support/testdata_registry.txt"
    )
    assert all(r.note for r in rows if not r.is_face), "every false detection says what it shows"
    counts = Counter(r.is_face for r in rows)
    assert counts[False] >= 50 and counts[True] >= 300
    keys = [(r.file, r.variant, r.detection.x, r.detection.y, r.detection.w) for r in rows]
    assert len(keys) == len(set(keys)), "each detection once"


@pytest.mark.parametrize("file", sorted(FALSE))
def test_known_false_detections_are_filtered_and_the_face_beside_them_kept(rows, file: str) -> None:
    image = open_image(data_file(file))
    wrong = row_for(rows, file, FALSE[file])
    face = row_for(rows, file, is_face=True)
    verdicts = check_faces(image, [face.detection, wrong.detection])
    assert verdicts[0].face and verdicts[0].probability >= THRESHOLD and verdicts[0].reason == ""
    assert not verdicts[1].face and verdicts[1].probability < THRESHOLD
    assert verdicts[1].reason.startswith("not a face (face check") and "skin" in verdicts[1].reason


def test_check_keeps_faces_and_drops_false_detections_on_the_checked_list(rows: list[checked.Checked]) -> None:
    """Full-size illustrations, every checked detection: the figures README reports (the check was fitted
    on this list, so this guards against regressions; bench/faces.py gives the held-out figures)."""
    full = [r for r in rows if r.variant == ""]
    by_file: dict[str, list[checked.Checked]] = {}
    for r in full:
        by_file.setdefault(r.file, []).append(r)
    kept = Counter()
    for file, group in by_file.items():
        image = open_image(data_file(file))
        for r, verdict in zip(group, check_faces(image, [r.detection for r in group]), strict=True):
            kept[(r.is_face, verdict.face)] += 1
    faces, others = kept[(True, True)] + kept[(True, False)], kept[(False, True)] + kept[(False, False)]
    assert faces >= 120 and others >= 15
    assert kept[(True, True)] / faces >= 0.97, kept
    assert kept[(False, True)] <= 1, kept
    assert kept[(True, True)] / (kept[(True, True)] + kept[(False, True)]) >= 0.97, kept


def test_rotated_pass_detections_are_judged_upright(rows: list[checked.Checked]) -> None:
    """A face found on a copy rotated by -25 degrees is checked on a crop turned back by that angle."""
    tilted = [r for r in rows if r.is_face and rotation_of(r.detection) and r.variant == "rot35"]
    assert len(tilted) >= 5
    r = tilted[0]
    image = checked.degraded(open_image(data_file(r.file)), r.variant)
    upright = features(image, r.detection)
    as_if_plain = features(
        image,
        Detection(
            r.detection.x,
            r.detection.y,
            r.detection.w,
            r.detection.h,
            r.detection.detector.split("@")[0],
            r.detection.score,
        ),
    )
    assert rotation_of(r.detection) == -25
    assert probability(upright) >= THRESHOLD
    assert upright != as_if_plain


def test_blank_and_noise_boxes_are_not_faces() -> None:
    from PIL import Image

    plain = Image.new("RGB", (400, 400), (250, 230, 220))  # skin-coloured and nothing else
    verdict = check(plain, Detection(100, 100, 200, 200, "animeface", 0.6))
    assert not verdict.face and "cascade 0/0" in verdict.reason


# ------------------------------------------------------------------------------- detect step ----
RIKO_WITH_RIBBON = "raw/sakurauchi_riko/6.jpg"  # one face, and a dress ribbon animeface takes for one


@pytest.fixture
def riko(service_env) -> int:
    add_characters(["sakurauchi_riko", "nishikino_maki"])
    return store_post(11, data_file(RIKO_WITH_RIBBON).read_bytes(), ["sakurauchi_riko", "1girl"], suffix="jpg")


def faces_of(post_id: int) -> list[Face]:
    with session_scope() as session:
        return list(session.exec(select(Face).where(Face.post_id == post_id).order_by(Face.id)).all())


def test_step_keeps_filtered_detections_with_their_reason(riko: int) -> None:
    faces = run_pipeline(riko)
    states = Counter(f.state for f in faces)
    assert states == {FaceState.ready: 1, FaceState.filtered: 1}, [(f.state, f.reason) for f in faces]
    real = next(f for f in faces if f.state == FaceState.ready)
    wrong = next(f for f in faces if f.state == FaceState.filtered)
    # the filtered detection does not make the post ambiguous: one face, one tracked character -> its tag
    assert real.label == "sakurauchi_riko" and real.label_source == LabelSource.tag
    assert wrong.reason.startswith("not a face (face check") and wrong.label is None and wrong.label_source is None
    assert wrong.path is None and wrong.sha256 is None and wrong.split is None, "never cropped"
    assert (wrong.x, wrong.y, wrong.w, wrong.h) != (real.x, real.y, real.w, real.h)
    row = post_row(riko)
    assert row.state == PostState.done and row.faces == 1
    assert detect_post(riko, get_settings()).next_ids == [], "a repeated message is a no-op"


def test_step_without_the_check_keeps_every_detection_as_a_face(riko: int, monkeypatch) -> None:
    monkeypatch.setenv("WAIFU_FACE_VERIFY", "false")
    reset_settings_cache()
    faces = run_pipeline(riko)
    assert len(faces) == 2 and all(f.state == FaceState.ready for f in faces)
    assert all(f.label_source == LabelSource.ambiguous and f.label is None for f in faces), "two faces: ambiguous"
    assert post_row(riko).faces == 2


def test_post_whose_only_detection_is_filtered_ends_with_no_face(service_env) -> None:
    """The same illustration with the face painted over: the ribbon is still detected, and is no face."""
    import io

    from PIL import ImageDraw

    image = open_image(data_file(RIKO_WITH_RIBBON))
    face = next(r for r in checked.load() if r.file == RIKO_WITH_RIBBON and r.is_face and r.variant == "")
    d, margin = face.detection, face.detection.w // 3
    ImageDraw.Draw(image).rectangle(
        [d.x - margin, d.y - margin, d.x + d.w + margin, d.y + d.h + margin], fill=(240, 240, 240)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    post_id = store_post(12, buffer.getvalue(), ["sakurauchi_riko"])
    outcome = detect_post(post_id, get_settings())
    faces = faces_of(post_id)
    assert len(faces) == 1 and faces[0].state == FaceState.filtered, [(f.state, f.reason) for f in faces]
    assert outcome.next_ids == [], "nothing for the crop step"
    row = post_row(post_id)
    assert row.state == PostState.done and row.faces == 0
    assert row.reason == "no face found (1 detection(s) judged not a face)"


def test_face_verify_setting_is_on_by_default_and_can_be_turned_off(monkeypatch) -> None:
    assert Settings(_env_file=None).face_verify is True
    monkeypatch.setenv("WAIFU_FACE_VERIFY", "false")
    assert Settings(_env_file=None).face_verify is False
