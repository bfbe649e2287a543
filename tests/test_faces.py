"""The face pipeline's plain functions on real illustrations, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from sqlmodel import select

from core.settings import get_settings
from crop.step import crop_face
from db.engine import session_scope
from db.models import Face, FaceState, LabelSource, PostState, Split
from detect.step import detect_post
from labels.manual import set_manual_label
from labels.rules import label_for, split_for
from scraper.characters import add_characters
from tests.support.pipeline import post_row, run_pipeline, side_by_side, store_post
from tests.support.testdata import data_file, raw_image, raw_names

# real illustrations (tests/support/testdata.py), fetched when a test first reads them: detection needs real faces
MAKI = "nishikino_maki/1.png"
RIKO = "sakurauchi_riko/1.jpg"


@pytest.fixture
def chars(service_env) -> list[str]:
    add_characters(["nishikino_maki", "sakurauchi_riko"])
    return ["nishikino_maki", "sakurauchi_riko"]


# each character's own picture: the label is the post's one tracked tag, not merely the first tracked one
@pytest.mark.parametrize(
    ("picture", "tag"), [(MAKI, "nishikino_maki"), (RIKO, "sakurauchi_riko")], ids=["first-tracked", "second-tracked"]
)
def test_one_character_one_face_is_labelled_by_tag(chars, picture, tag) -> None:
    post_id = store_post(1, raw_image(picture).read_bytes(), [tag, "1girl"], suffix=picture.rsplit(".", 1)[1])
    faces = run_pipeline(post_id)
    assert len(faces) == 1
    face = faces[0]
    assert face.state == FaceState.ready
    assert face.label == tag and face.label_source == LabelSource.tag
    # the character's first labelled face: training, whatever its hash (WAIFU_MIN_TRAIN_FACES)
    assert face.split == Split.train
    crop = get_settings().data_dir / face.path
    assert crop.name == f"{face.sha256}.png"
    assert hashlib.sha256(crop.read_bytes()).hexdigest() == face.sha256
    assert Image.open(crop).size == (96, 96)
    assert face.crop_right - face.crop_left == face.crop_bottom - face.crop_top
    row = post_row(post_id)
    assert row.state == PostState.done and row.faces == 1
    # a repeated message is a no-op
    assert detect_post(post_id, get_settings()).next_ids == []


def test_every_face_is_kept_and_several_faces_are_ambiguous(chars) -> None:
    post_id = store_post(2, side_by_side(MAKI, RIKO), ["nishikino_maki"])
    faces = run_pipeline(post_id)
    assert len(faces) >= 2
    assert all(f.state == FaceState.ready and f.label is None for f in faces)
    assert all(f.label_source == LabelSource.ambiguous for f in faces)
    assert post_row(post_id).faces == len(faces)


def test_two_tracked_characters_make_the_face_ambiguous(chars) -> None:
    faces = run_pipeline(store_post(3, raw_image(MAKI).read_bytes(), ["nishikino_maki", "sakurauchi_riko"]))
    assert [f.label_source for f in faces] == [LabelSource.ambiguous]


def test_post_without_a_face_ends_done_with_zero_faces(chars) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (400, 300), (200, 220, 240)).save(buffer, format="PNG")
    post_id = store_post(4, buffer.getvalue(), ["nishikino_maki"])
    assert run_pipeline(post_id) == []
    row = post_row(post_id)
    assert row.state == PostState.done and row.faces == 0 and row.reason == "no face found"


def test_unreadable_stored_file_fails_the_post_with_a_reason(chars) -> None:
    post_id = store_post(5, b"this is not an image at all", ["nishikino_maki"])
    run_pipeline(post_id)
    row = post_row(post_id)
    assert row.state == PostState.failed and "face detection failed" in row.reason


def test_manual_label_and_reject_override_the_automatic_label(chars) -> None:
    face = run_pipeline(store_post(6, raw_image(MAKI).read_bytes(), ["nishikino_maki", "sakurauchi_riko"]))[0]
    assert face.label_source == LabelSource.ambiguous
    labelled = set_manual_label(face.id, "nishikino_maki")
    assert labelled.label == "nishikino_maki" and labelled.label_source == LabelSource.manual
    rejected = set_manual_label(face.id, None)
    assert rejected.state == FaceState.rejected and rejected.label is None
    with pytest.raises(LookupError, match="not a tracked character"):
        set_manual_label(face.id, "someone_else")
    with pytest.raises(LookupError, match="no face"):
        set_manual_label(999_999, "nishikino_maki")


def test_near_duplicate_repost_follows_its_original(chars) -> None:
    original = run_pipeline(store_post(7, raw_image(MAKI).read_bytes(), ["nishikino_maki"]))[0]
    image = Image.open(raw_image(MAKI)).convert("RGB")
    smaller = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    smaller.save(buffer, format="JPEG", quality=70)  # re-encoded, resized, recompressed
    copy = run_pipeline(store_post(8, buffer.getvalue(), ["nishikino_maki"], suffix="jpg"))[0]
    assert copy.sha256 != original.sha256
    assert copy.duplicate_of == original.id
    assert copy.split == original.split

    other = run_pipeline(store_post(9, raw_image(RIKO).read_bytes(), ["sakurauchi_riko"]))[0]
    assert other.duplicate_of is None


def test_split_is_stable_across_runs_with_new_data_in_between(chars) -> None:
    first = run_pipeline(store_post(10, raw_image(MAKI).read_bytes(), ["nishikino_maki"]))
    before = {f.id: (f.sha256, f.split, f.duplicate_of) for f in first}
    # new data arrives: other pictures, and a resized, recompressed repost of the same picture
    for i, name in enumerate([n for n in raw_names() if "/sakurauchi_riko/" in n][1:4]):
        path = data_file(name)
        run_pipeline(store_post(20 + i, path.read_bytes(), ["sakurauchi_riko"], suffix=path.suffix[1:]))
    image = Image.open(raw_image(MAKI)).convert("RGB")
    buffer = io.BytesIO()
    image.resize((image.width * 4 // 5, image.height * 4 // 5)).save(buffer, format="JPEG", quality=75)
    [repost] = run_pipeline(store_post(30, buffer.getvalue(), ["nishikino_maki"], suffix="jpg"))
    # the first face, read back as it is now, has not moved; its repost follows it
    with session_scope() as session:
        now = {
            f.id: (f.sha256, f.split, f.duplicate_of)
            for f in session.exec(select(Face).where(Face.post_id == 10)).all()
        }
        every = session.exec(select(Face)).all()
    assert now == before
    assert repost.duplicate_of == first[0].id and repost.split == first[0].split
    # an unlabelled face's split is its hash's; a labelled one's its character's count (under
    # WAIFU_MIN_TRAIN_FACES: train); a near-duplicate's its original's
    originals = {f.id: f for f in every}
    for face in every:
        if face.duplicate_of:
            expected = originals[face.duplicate_of].split
        else:
            expected = Split.train if face.label else split_for(face.sha256, 0.15)
        assert face.split == expected, face


def test_split_for_is_deterministic_and_near_85_15() -> None:
    rng = random.Random(7)
    hashes = [hashlib.sha256(rng.randbytes(16)).hexdigest() for _ in range(20000)]
    splits = [split_for(h, 0.15) for h in hashes]
    assert splits == [split_for(h, 0.15) for h in hashes]
    share = splits.count(Split.test) / len(splits)
    assert 0.14 <= share <= 0.16


def test_label_rule() -> None:
    assert label_for(["maki"], 1) == ("maki", LabelSource.tag)
    assert label_for(["maki"], 2) == (None, LabelSource.ambiguous)
    assert label_for(["maki", "riko"], 1) == (None, LabelSource.ambiguous)
    assert label_for([], 1) == (None, LabelSource.ambiguous)


def test_missing_detector_model_leaves_the_post_waiting(chars, monkeypatch) -> None:
    from core.settings import reset_settings_cache

    monkeypatch.setenv("WAIFU_LBPCASCADE_PATH", "/nonexistent/lbpcascade_animeface.xml")
    monkeypatch.setenv("WAIFU_DETECTOR", "lbpcascade")
    reset_settings_cache()
    post_id = store_post(40, raw_image(MAKI).read_bytes(), ["nishikino_maki"])
    assert run_pipeline(post_id) == []
    row = post_row(post_id)
    assert row.state == PostState.downloaded, "a machine problem must not fail the image"
    assert "waiting for the detector" in row.reason and "WAIFU_LBPCASCADE_PATH" in row.reason


def others_wait_for_a_lock(count: int) -> bool:
    """True once `count` other sessions of this database wait for a lock (a row lock, on PostgreSQL). On
    SQLite every write transaction holds the whole database from BEGIN IMMEDIATE: nobody else is inside one."""
    from sqlalchemy import text

    from db.engine import get_engine

    engine = get_engine()
    if engine.dialect.name == "sqlite":
        return True
    with engine.connect() as conn:
        waiting = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        ).scalar_one()
    return waiting >= count


def test_faces_of_one_post_finished_concurrently_close_the_post(chars, monkeypatch) -> None:
    """Workers record the faces of one post at the same moment: the last one must see the others `ready` and
    close the post. Forced: every crop is cut first, then all commits start together (a barrier); at the
    "is the post complete?" check each waits until every other worker is there too or blocked on a lock,
    and if they are all there, nobody commits before all have looked (without the post's row lock each
    would see the others still `detected`, and the post would never close)."""
    from contextlib import contextmanager

    import crop.step as step

    settings = get_settings()
    post_id = store_post(50, side_by_side(MAKI, RIKO), ["nishikino_maki"])
    face_ids = detect_post(post_id, settings).next_ids
    workers = len(face_ids)
    assert workers >= 2
    commit_together = threading.Barrier(workers, timeout=120)
    looked_together = threading.Barrier(workers, timeout=120)
    guard = threading.Lock()
    count = {"arrived": 0, "inside": 0}
    real_still_claimed, real_finish = step.still_claimed, step.finish_post_if_complete

    @contextmanager
    def commit_at_once(*args, **kwargs):
        commit_together.wait()
        with real_still_claimed(*args, **kwargs) as pair:
            yield pair

    def check_at_once(session, post) -> None:
        with guard:
            count["arrived"] += 1
            count["inside"] += 1
        deadline = time.monotonic() + 120
        while count["arrived"] < workers and not others_wait_for_a_lock(workers - count["arrived"]):
            assert time.monotonic() < deadline, "the other workers neither arrived nor waited for a lock"
            time.sleep(0.005)
        with guard:
            together = count["inside"] == workers
        real_finish(session, post)
        if together:
            looked_together.wait()
        with guard:
            count["inside"] -= 1

    monkeypatch.setattr(step, "still_claimed", commit_at_once)
    monkeypatch.setattr(step, "finish_post_if_complete", check_at_once)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        states = list(pool.map(lambda f: crop_face(f, settings).state, face_ids))
    assert set(states) == {FaceState.ready}
    assert post_row(post_id).state == PostState.done


def test_a_labelled_face_goes_to_test_once_its_character_has_enough_training_faces(chars) -> None:
    from db.models import Post
    from tests.support.rows import ready_face

    with session_scope() as session:  # 10 training faces of maki already (WAIFU_MIN_TRAIN_FACES)
        for i in range(10):
            session.add(Post(id=500 + i, md5=f"{500 + i:032x}", file_url="https://safebooru.org//x", state="done"))
            session.flush()
            session.add(ready_face(500 + i, f"faces/{i}.png", "train", "nishikino_maki", LabelSource.tag))
    [face] = run_pipeline(store_post(1, raw_image(MAKI).read_bytes(), ["nishikino_maki"]))
    assert face.label == "nishikino_maki" and face.split == Split.test  # the 11th: about 15% go to test
    [riko] = run_pipeline(store_post(2, raw_image(RIKO).read_bytes(), ["sakurauchi_riko"], suffix="jpg"))
    assert riko.split == Split.train  # riko's first face
