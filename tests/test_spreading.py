"""Label spreading (labels.spreading) on the real 96x96 crops of tests/support/testdata.py: the seeds'
characters reach the open faces over the graph, each post's assignment keeps to its tags, and the retrain's
inferred labels (train.spread_inputs, on SQLite and PostgreSQL) resolve faces the model alone leaves open.
The faces page's most-useful-first rule (labels.priority) is checked here as a function; tests/test_web.py
checks the page."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlmodel import select

from core.settings import get_settings
from db.engine import session_scope
from db.models import Character, Face, LabelSource, ModelStatus, ModelVersion, Post, PostCharacter
from labels.priority import RARE, UNTAGGED, usefulness
from labels.spreading import SpreadConfig, post_labels, spread, spread_with_posts
from scraper.characters import add_characters
from tests.support.crops import HIFUMI, MAKI, RIKO, TRACKED, crops
from tests.support.rows import ready_face
from train.spread_inputs import infer_with_spreading
from train.weak_inputs import infer_with_model


def features(paths: list[Path]) -> np.ndarray:
    from train.features import FeatureConfig, extract, load_images

    return extract(load_images(paths, 96), FeatureConfig())


def posts_of_test_crops() -> list[tuple[list[tuple[Path, str]], list[str]]]:
    """18 posts of two faces from the test crops: [maki] maki + hifumi, [riko] riko + hifumi, [maki, riko]."""
    test = {t: crops("test", t) for t in (MAKI, RIKO, HIFUMI)}
    posts = []
    for i in range(6):
        posts.append(([(test[MAKI][i], MAKI), (test[HIFUMI][i], HIFUMI)], [MAKI]))
        posts.append(([(test[HIFUMI][(i + 3) % 6], HIFUMI), (test[RIKO][i], RIKO)], [RIKO]))
        posts.append(([(test[MAKI][(i + 1) % 6], MAKI), (test[RIKO][(i + 2) % 6], RIKO)], [MAKI, RIKO]))
    return posts


# ----------------------------------------------------------------------------- pure parts ----
def test_spreading_carries_the_seeds_characters_to_real_faces() -> None:
    characters = [MAKI, RIKO, HIFUMI]
    seeds = [(p, i) for i, t in enumerate(characters) for p in crops("train", t)[:10]]
    open_faces = [(p, i) for i, t in enumerate(characters) for p in crops("test", t)]
    x = features([p for p, _ in seeds] + [p for p, _ in open_faces])
    labels = np.array([c for _, c in seeds] + [-1] * len(open_faces))

    distribution = spread(x, labels, 3, SpreadConfig(neighbours=5))

    assert distribution.shape == (len(labels), 3)
    assert np.allclose(distribution.sum(1), 1.0)
    found = distribution[len(seeds) :].argmax(1)
    truth = np.array([c for _, c in open_faces])
    assert (found == truth).mean() >= 0.8, f"{(found == truth).sum()} of {len(truth)} test crops right"
    assert (distribution[: len(seeds)].argmax(1) == labels[: len(seeds)]).all(), "seeds keep their label"
    assert not spread(x, -np.ones(len(labels), int), 3).any(), "no seed: nothing to spread"


def test_each_post_gives_only_its_characters_each_to_one_face() -> None:
    seeds = [(p, i) for i, t in enumerate(TRACKED) for p in crops("train", t)]
    posts = posts_of_test_crops()
    paths = sorted({p for faces, _ in posts for p, _ in faces})
    row = {p: len(seeds) + i for i, p in enumerate(paths)}
    x = features([p for p, _ in seeds] + paths)
    labels = np.array([c for _, c in seeds] + [-1] * len(paths))
    indexed = [([row[p] for p, _ in faces], [TRACKED.index(t) for t in tags]) for faces, tags in posts]

    distribution = spread(x, labels, 2)
    kept = post_labels(distribution, indexed, 0.0, 0.0)

    truth = {row[p]: t for faces, _ in posts for p, t in faces}
    right = 0
    for (faces, classes), pairs in zip(indexed, kept, strict=True):
        assert len(pairs) == len(classes), "with no threshold every character is placed"
        assert {c for _, c, _ in pairs} == set(classes) and {f for f, _, _ in pairs} <= set(faces)
        assert len({f for f, _, _ in pairs}) == len(pairs), "one face holds one character at most"
        right += sum(truth[f] == TRACKED[c] for f, c, _ in pairs)
    assert right >= 0.9 * sum(len(c) for _, c in indexed)
    # a second round: the faces placed surely are seeds now, and they are certain of their character
    prior = np.concatenate([np.eye(2)[labels[: len(seeds)]], np.full((len(paths), 2), 0.5)])
    once = spread_with_posts(x, labels, 2, indexed, prior, rounds=1)
    twice = spread_with_posts(x, labels, 2, indexed, prior, rounds=2, sure_margin=0.3)
    sure = [f for pairs in post_labels(once, indexed, 0.3, 0.0) for f, _, _ in pairs]
    assert sure and (twice[sure].max(1) > once[sure].max(1)).all()


def test_usefulness_puts_doubt_rarity_and_the_posts_tags_first() -> None:
    # the less sure the model, the more a label is worth; a tag label nobody doubts is worth nothing
    assert usefulness("ambiguous", 0.3) > usefulness("ambiguous", 0.9) > 0
    assert usefulness("tag") == usefulness("manual") == 0.0
    assert usefulness("tag", doubt_score=0.9) == pytest.approx(0.1), "the chance the tag was right after all"
    assert usefulness("inferred", inferred_margin=0.2) > usefulness("inferred", inferred_margin=0.8)
    # a character with few labelled faces first: half the weight at RARE faces
    assert usefulness("ambiguous", 0.5, labelled=int(RARE)) == pytest.approx(usefulness("ambiguous", 0.5) / 2)
    # a suggestion the post is not tagged with: most likely someone untracked
    assert usefulness("ambiguous", 0.5, suggestion_tagged=False) == pytest.approx(0.5 * UNTAGGED)
    assert usefulness(None) == usefulness("ambiguous") > 0, "no suggestion yet: worth a look"


# --------------------------------------------------------------------- the retrain's labels ----
@pytest.fixture(scope="module")
def early_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model from when the collection was small: the classical part on 3 train crops per character."""
    from train.features import load_images
    from train.model import Dataset, TrainConfig, save_artifacts, train

    items = [(p, tag) for tag in TRACKED for p in crops("train", tag)[:3]]
    data = Dataset(load_images([p for p, _ in items], 96), np.array([TRACKED.index(t) for _, t in items]), TRACKED)
    directory = tmp_path_factory.mktemp("model") / "v1"
    save_artifacts(train(data, TrainConfig(backbone="none")).classifier, directory)
    return directory


def store_post(post_id: int, tags: list[str], faces: list[tuple[Path, str | None, str]]) -> list[int]:
    settings = get_settings()
    ids = []
    with session_scope() as session:
        session.add(
            Post(id=post_id, md5=f"{post_id:032x}", file_url="https://safebooru.org//x", state="done", faces=len(faces))
        )
        session.flush()
        for tag in tags:
            character = session.exec(select(Character).where(Character.tag == tag)).one()
            session.add(PostCharacter(post_id=post_id, character_id=character.id))
        for path, label, source in faces:
            relative = f"faces/{post_id}-{len(ids)}{path.suffix}"
            (settings.data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, settings.data_dir / relative)
            face = ready_face(post_id, relative, "train", label, source)
            session.add(face)
            session.flush()
            ids.append(face.id)
    return ids


def test_spreading_resolves_faces_the_model_alone_leaves_open(service_env, early_model: Path) -> None:
    add_characters(TRACKED)
    post_id = 1
    for tag in TRACKED:  # the collection has grown since the model: 30 tag faces per character
        for path in crops("train", tag):
            store_post(post_id, [tag], [(path, tag, LabelSource.tag)])
            post_id += 1
    truth = {}
    for faces, tags in posts_of_test_crops():
        ids = store_post(post_id, tags, [(p, None, LabelSource.ambiguous) for p, _ in faces])
        truth.update(zip(ids, [t for _, t in faces], strict=True))
        post_id += 1
    settings = get_settings()
    shutil.copytree(early_model, settings.data_dir / "models" / "v1")
    with session_scope() as session:
        session.add(ModelVersion(status=ModelStatus.current, artifact_dir="models/v1", reason="early model"))

    def inferred() -> tuple[int, int]:
        with session_scope() as session:
            rows = session.exec(select(Face.id, Face.label).where(Face.label_source == LabelSource.inferred)).all()
        return sum(truth[i] == label for i, label in rows), sum(truth[i] != label for i, label in rows)

    model_counts = infer_with_model(settings)
    model_right, model_wrong = inferred()
    counts = infer_with_spreading(settings)
    right, wrong = inferred()

    assert counts.get("spreading") is True and model_counts.get("spreading") is None
    assert counts["posts"] == model_counts["posts"] == 18
    assert right > model_right, f"spreading {right} right labels, the model alone {model_right}"
    assert wrong <= model_wrong and wrong / (right + wrong) <= 0.1
