"""Weak supervision (labels.weak, fed by train.weak_inputs) on SQLite and PostgreSQL, with the real 96x96
crops of tests/support/testdata.py and a real model (train.model's classical part, saved and loaded as a
retrain does): inferred labels for the faces of a post from its tags, doubtful tag labels, and how both
show in training data, status and the web page."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from rich.console import Console
from sqlmodel import select

from core.settings import get_settings
from db.engine import session_scope
from db.models import Character, Face, FaceState, LabelSource, ModelStatus, ModelVersion, Post, PostCharacter
from labels.manual import label_faces, reject_faces, set_manual_label, undo
from labels.rules import inferred_pairs
from labels.weak import DOUBT_MIN_PROBABILITY, INFER_MIN_MARGIN
from predict.suggest import suggest_for_ambiguous
from scraper.characters import add_characters
from tests.support.crops import HIFUMI, MAKI, RIKO, TRACKED, crops
from tests.support.rows import ready_face
from train.registry import labelled_count, labelled_faces
from train.weak_inputs import infer_with_model, judge_tag_labels


def test_crop(tag: str, number: int) -> Path:
    """One of the 6 test crops of a character (numbered 31..36 in the set)."""
    return next(p for p in crops("test", tag) if p.stem == str(number))


test_crop.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The classical model (HOG + colour, logistic regression) on the train crops of the two tracked
    characters, saved by train.model as a retrain saves it. Trained once for the module (a few seconds)."""
    from train.features import load_images
    from train.model import Dataset, TrainConfig, save_artifacts, train

    items = [(p, tag) for tag in TRACKED for p in crops("train", tag)]
    data = Dataset(load_images([p for p, _ in items], 96), np.array([TRACKED.index(t) for _, t in items]), TRACKED)
    directory = tmp_path_factory.mktemp("model") / "v1"
    save_artifacts(train(data, TrainConfig(backbone="none")).classifier, directory)
    return directory


class Collection:
    """Posts and ready faces as the pipeline leaves them, built from real crops."""

    def __init__(self) -> None:
        self.next_post = 1
        self.files = 0

    def post(
        self,
        tags: list[str],
        faces: list[Path],
        source: str = LabelSource.ambiguous,
        split: str = "train",
        label: str | None = None,
    ) -> list[int]:
        settings = get_settings()
        post_id, self.next_post = self.next_post, self.next_post + 1
        ids = []
        with session_scope() as session:
            session.add(
                Post(
                    id=post_id,
                    md5=f"{post_id:032x}",
                    file_url="https://safebooru.org//x",
                    state="done",
                    tags=" ".join(tags),
                    faces=len(faces),
                )
            )
            session.flush()
            for tag in tags:
                character = session.exec(select(Character).where(Character.tag == tag)).one()
                session.add(PostCharacter(post_id=post_id, character_id=character.id))
            for path in faces:
                self.files += 1
                relative = f"faces/{self.files:04d}{path.suffix}"
                (settings.data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, settings.data_dir / relative)
                face = ready_face(post_id, relative, split, label, source)
                session.add(face)
                session.flush()
                ids.append(face.id)
        return ids


@pytest.fixture
def collection(service_env, saved_model: Path) -> Collection:
    """Two tracked characters, their 30 train crops each as tag-labelled single-face posts, and the saved
    model registered as the current version."""
    add_characters(TRACKED)
    made = Collection()
    for tag in TRACKED:
        for path in crops("train", tag):
            made.post([tag], [path], source=LabelSource.tag, label=tag)
    settings = get_settings()
    shutil.copytree(saved_model, settings.data_dir / "models" / "v1")
    with session_scope() as session:
        session.add(ModelVersion(status=ModelStatus.current, artifact_dir="models/v1", reason="test model"))
    return made


def faces_by_id(ids: list[int]) -> dict[int, Face]:
    with session_scope() as session:
        return {f.id: f for f in session.exec(select(Face).where(Face.id.in_(ids))).all()}


def trained_paths(split: str) -> dict[str, str]:
    """Relative path -> label of what a retrain would train on (train) or evaluate on (test)."""
    settings = get_settings()
    with session_scope() as session:
        return {
            p.relative_to(settings.data_dir).as_posix(): label for p, label in labelled_faces(session, settings, split)
        }


# ------------------------------------------------------------------------------- the rule ----
def test_inferred_pairs_rule() -> None:
    # one character: the best face, by its margin over the runner-up
    assert inferred_pairs([[0.1], [0.95], [0.2]], 0.4) == [(1, 0, pytest.approx(0.75))]
    assert inferred_pairs([[0.6], [0.55]], 0.4) == []  # two look-alikes: no clear winner
    # two characters, two faces: the assignment, each pair with what swapping would cost
    assert inferred_pairs([[0.1, 0.9], [0.8, 0.3]], 0.4) == [(0, 1, pytest.approx(1.3)), (1, 0, pytest.approx(1.3))]
    # a clear margin but a weak own probability: the character's face was probably missed
    assert inferred_pairs([[0.45], [0.0]], 0.4) == [(0, 0, pytest.approx(0.45))]
    assert inferred_pairs([[0.45], [0.0]], 0.4, min_score=0.6) == []
    # one face, or fewer faces than characters: nothing to compare, or someone is missing
    assert inferred_pairs([[0.99]], 0.0) == []
    assert inferred_pairs([[0.9, 0.1], [0.1, 0.2]][:1], 0.0) == []


# --------------------------------------------------------------------------- inferred labels ----
def test_the_tagged_characters_face_is_inferred_and_trained_on_in_the_train_split_only(collection) -> None:
    other, maki = collection.post([MAKI], [test_crop(HIFUMI, 32), test_crop(MAKI, 31)])
    riko2, maki2 = collection.post([MAKI, RIKO], [test_crop(RIKO, 33), test_crop(MAKI, 33)])
    maki_test, other_test = collection.post([MAKI], [test_crop(MAKI, 32), test_crop(HIFUMI, 34)], split="test")
    before = labelled_count_now()

    counts = infer_with_model(get_settings())

    assert counts["model"] is not None and counts["posts"] == 3 and counts["faces_scored"] == 6
    assert (counts["inferred"], counts["new"], counts["reverted"]) == (4, 4, 0)
    faces = faces_by_id([other, maki, riko2, maki2, maki_test, other_test])
    assert {i: (f.label, f.label_source) for i, f in faces.items()} == {
        other: (None, LabelSource.ambiguous),
        maki: (MAKI, LabelSource.inferred),
        riko2: (RIKO, LabelSource.inferred),
        maki2: (MAKI, LabelSource.inferred),
        maki_test: (MAKI, LabelSource.inferred),
        other_test: (None, LabelSource.ambiguous),
    }
    assert faces[maki].inferred_margin >= INFER_MIN_MARGIN and faces[other].inferred_margin is None
    train, test = trained_paths("train"), trained_paths("test")
    assert train[faces[maki].path] == MAKI and train[faces[riko2].path] == RIKO and train[faces[maki2].path] == MAKI
    assert faces[maki_test].path not in test and faces[maki_test].path not in train, "never evaluated on"
    assert test == {}, "only the inferred face is in the test split here"
    assert labelled_count_now() == before, "inferred labels do not count towards the retrain rule"

    # re-running with the same model changes nothing
    again = infer_with_model(get_settings())
    assert (again["inferred"], again["new"], again["relabelled"], again["reverted"]) == (4, 0, 0, 0)

    # the model's suggestion goes on inferred faces too (a person checks them on the faces page), and on
    # the ambiguous ones; tag-labelled faces get none
    assert suggest_for_ambiguous(get_settings()) == 6
    faces = faces_by_id([other, maki, riko2, maki2, maki_test, other_test])
    assert all(faces[i].suggestion == faces[i].label for i in (maki, riko2, maki2, maki_test))
    assert faces[other].suggestion and faces[other_test].suggestion


def labelled_count_now() -> int:
    with session_scope() as session:
        return labelled_count(session)


def test_an_unclear_margin_stays_ambiguous_and_a_rerun_takes_an_inferred_label_back(collection) -> None:
    look_alike = collection.post([MAKI], [test_crop(MAKI, 36), test_crop(HIFUMI, 31)])  # hifumi 31 looks like maki
    twice = collection.post([MAKI], [test_crop(MAKI, 35), test_crop(MAKI, 31)])  # the character twice
    other, maki = collection.post([MAKI], [test_crop(HIFUMI, 35), test_crop(MAKI, 34)])

    counts = infer_with_model(get_settings())
    assert counts["inferred"] == 1
    faces = faces_by_id(look_alike + twice + [other, maki])
    assert [i for i, f in faces.items() if f.label_source == LabelSource.inferred] == [maki]
    assert all(faces[i].label is None and faces[i].label_source == LabelSource.ambiguous for i in look_alike + twice)

    # a stricter rule (as a model that is less sure would give): the label goes back to ambiguous
    stricter = infer_with_model(get_settings(), min_margin=1.01)
    assert (stricter["inferred"], stricter["reverted"]) == (0, 1)
    back = faces_by_id([maki])[maki]
    assert (back.label, back.label_source, back.inferred_margin) == (None, LabelSource.ambiguous, None)
    assert infer_with_model(get_settings())["new"] == 1


def test_no_current_model_leaves_inferred_labels_as_they_are(collection) -> None:
    _, maki = collection.post([MAKI], [test_crop(HIFUMI, 32), test_crop(MAKI, 31)])
    infer_with_model(get_settings())
    with session_scope() as session:
        for version in session.exec(select(ModelVersion)).all():
            version.status = ModelStatus.retired
    counts = infer_with_model(get_settings())
    assert counts["model"] is None and "no current model" in counts["reason"]
    assert faces_by_id([maki])[maki].label_source == LabelSource.inferred


def test_manual_labels_and_rejects_are_never_overwritten_and_undo_works(collection) -> None:
    # a person named one face and rejected another before any inference
    named, rejected, other = collection.post([MAKI], [test_crop(MAKI, 31), test_crop(MAKI, 32), test_crop(HIFUMI, 32)])
    set_manual_label(named, RIKO)  # whatever a person says stands, right or wrong
    reject_faces([rejected])
    riko, maki = collection.post([MAKI, RIKO], [test_crop(RIKO, 33), test_crop(MAKI, 33)])

    infer_with_model(get_settings())
    faces = faces_by_id([named, rejected, other, riko, maki])
    assert (faces[named].label, faces[named].label_source) == (RIKO, LabelSource.manual)
    assert faces[rejected].state == FaceState.rejected and faces[rejected].label_source == LabelSource.manual
    assert faces[other].label_source == LabelSource.ambiguous, "one candidate left: nothing to compare it with"
    assert faces[maki].label_source == LabelSource.inferred and faces[riko].label_source == LabelSource.inferred

    # a person overrides an inferred label; inference never takes it back; undo restores the inferred label
    action = label_faces([maki], RIKO)
    changed = faces_by_id([maki])[maki]
    assert (changed.label, changed.label_source, changed.inferred_margin) == (RIKO, LabelSource.manual, None)
    counts = infer_with_model(get_settings())
    assert faces_by_id([maki])[maki].label_source == LabelSource.manual
    # the person says the other character is in that face: the inferred label of the other face goes (one
    # character and one candidate left: nothing to compare it with)
    assert (counts["posts"], counts["reverted"]) == (0, 1)
    assert faces_by_id([riko])[riko].label_source == LabelSource.ambiguous
    assert undo().action == action.action
    restored = faces_by_id([maki])[maki]
    assert (restored.label, restored.label_source) == (MAKI, LabelSource.inferred)
    assert infer_with_model(get_settings())["inferred"] == 2


# ------------------------------------------------------------------------------ doubtful tags ----
def test_a_wrongly_tagged_face_is_flagged_excluded_and_cleared_by_a_manual_label(collection) -> None:
    # the character's own face was missed: the only detected face is someone else's
    [wrong_train] = collection.post([MAKI], [test_crop(RIKO, 31)], source=LabelSource.tag, label=MAKI)
    [wrong_test] = collection.post([RIKO], [test_crop(MAKI, 34)], source=LabelSource.tag, label=RIKO, split="test")
    [right_test] = collection.post([MAKI], [test_crop(MAKI, 35)], source=LabelSource.tag, label=MAKI, split="test")

    counts = judge_tag_labels(get_settings())

    assert counts["classes"] == 2 and counts["judged"] == 60 + 1 + 2  # every tag face of a known character
    with session_scope() as session:
        flagged = {f.id: f for f in session.exec(select(Face).where(Face.doubt_score.is_not(None))).all()}
    assert {wrong_train, wrong_test} <= set(flagged)
    # a right tag label the out-of-fold model gets wrong with confidence is flagged too (bench/inferred.py:
    # about 3% of right labels at this threshold); here at most one of the 61 right ones
    false_flags = set(flagged) - {wrong_train, wrong_test}
    assert len(false_flags) <= 1 and right_test not in false_flags
    assert counts["doubtful"] == len(flagged)
    assert flagged[wrong_train].doubt.startswith(f"a model trained without this face calls it {RIKO}")
    assert flagged[wrong_test].doubt.startswith(f"a model trained without this face calls it {MAKI}")
    assert all(f.doubt_score >= DOUBT_MIN_PROBABILITY for f in flagged.values())
    train, test = trained_paths("train"), trained_paths("test")
    assert flagged[wrong_train].path not in train and len(train) == 60 - len(false_flags)
    assert all(flagged[i].path not in train for i in false_flags)
    assert test == {faces_by_id([right_test])[right_test].path: MAKI}, "the doubtful test face is not evaluated on"

    # a person names the face: no more doubt, trained on with the person's label
    set_manual_label(wrong_train, RIKO)
    fixed = faces_by_id([wrong_train])[wrong_train]
    assert (fixed.doubt, fixed.doubt_score, fixed.label_source) == (None, None, LabelSource.manual)
    assert trained_paths("train")[fixed.path] == RIKO
    # the next check judges tag faces only: the manual one stays clear, the wrong test label stays doubtful
    # (a false flag may clear: the corrected face is now a right example of its character)
    again = judge_tag_labels(get_settings())
    with session_scope() as session:
        now = set(session.exec(select(Face.id).where(Face.doubt_score.is_not(None))).all())
    assert {wrong_test} <= now <= {wrong_test} | false_flags
    assert again["doubtful"] == len(now) and again["judged"] == 60 + 2


# ----------------------------------------------------------------------------- status and web ----
def test_status_and_the_faces_page_show_inferred_and_doubtful_faces(collection) -> None:
    from waifu.status import collect_status
    from waifu.status_view import render_status
    from waifu.web.server import serving_in_thread

    _, maki = collection.post([MAKI], [test_crop(HIFUMI, 32), test_crop(MAKI, 31)])
    [wrong] = collection.post([MAKI], [test_crop(RIKO, 31)], source=LabelSource.tag, label=MAKI)
    infer_with_model(get_settings())
    judge_tag_labels(get_settings())

    with session_scope() as session:
        doubtful = sorted(session.exec(select(Face.id).where(Face.doubt_score.is_not(None))).all())
    assert wrong in doubtful and len(doubtful) <= 2  # the wrong one, and at most one false flag (see above)

    faces = collect_status(get_settings())["faces"]
    assert faces["label_sources"] == {"tag": 61, "ambiguous": 1, "inferred": 1}
    assert faces["doubtful"] == len(doubtful)
    assert faces["inferred_per_character"] == {MAKI: 1}
    assert faces["per_character"] == {MAKI: {"train": 31}, RIKO: {"train": 30}}, "tag labels, the doubtful one too"
    console = Console(record=True, width=200)
    render_status(console, collect_status(get_settings()))
    text = console.export_text()
    assert "label: inferred" in text and "doubtful tag" in text
    row = [line for line in text.splitlines() if MAKI in line and "│" in line][-1]  # the recognition table
    # faces 32 (31 tag, 1 inferred), train 30 (the doubtful one left out), test 0, inferred 1, no F1 recorded
    assert [cell.strip() for cell in row.split("│") if cell.strip()] == [MAKI, "32", "30", "0", "1", "-"]

    with serving_in_thread(get_settings()) as base, httpx.Client(base_url=base, timeout=30) as client:

        def card_ids(url: str) -> list[int]:
            page = client.get(url)
            assert page.status_code == 200, page.text[:500]
            return [int(m) for m in re.findall(r'id="face-(\d+)"', page.text)]

        assert card_ids("/faces?source=inferred") == [maki]
        assert card_ids("/faces?doubtful=yes") == doubtful
        assert wrong not in card_ids("/faces?doubtful=no&source=tag")
        page = client.get("/faces?doubtful=yes").text
        assert "doubtful" in page and f"calls it {RIKO}" in page
        assert client.get("/faces?doubtful=maybe").status_code == 400
