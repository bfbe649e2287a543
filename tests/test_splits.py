"""Splits stratified by character (labels.rules, labels.splits, crop.step) on SQLite and PostgreSQL: no
test face before a character has WAIFU_MIN_TRAIN_FACES training faces, about 15% test after that, a face
never moves from train to test, and a near-duplicate moves with its original. Class weights for the loss."""

from __future__ import annotations

import numpy as np
from sqlmodel import select

from core.settings import get_settings
from db.engine import session_scope
from db.models import Face, LabelSource, Post, Split
from labels.rules import allowed_test_faces, split_for_labelled
from labels.splits import rebalance_splits, split_counts
from tests.support.rows import ready_face
from train.model.data import class_weights


def test_no_test_face_before_the_minimum_then_about_15_percent() -> None:
    train = test = 0
    history = []
    for _ in range(200):
        split = split_for_labelled(train, test, 0.15, 10)
        train, test = train + (split == Split.train), test + (split == Split.test)
        history.append((train, test))
    assert all(te == 0 for tr, te in history[:10])  # the first 10 faces all train
    assert history[10] == (10, 1)  # the 11th is the first test face
    for tr, te in history[10:]:
        assert tr >= 10 and te == allowed_test_faces(tr + te, 0.15, 10)
    assert all(abs(te / (tr + te) - 0.15) < 0.03 for tr, te in history[30:])
    assert (
        allowed_test_faces(14, 0.15, 10) == 2
        and allowed_test_faces(9, 0.15, 10) == 0
        and allowed_test_faces(100, 0.15, 10) == 15
    )


def faces(split_of: list[str], tag: str, start: int, duplicate_of: dict[int, int] | None = None) -> list[int]:
    """Ready tag faces of one character, one post each, with the given splits; returns their ids."""
    ids = []
    with session_scope() as session:
        for i, split in enumerate(split_of):
            session.add(Post(id=start + i, md5=f"{start + i:032x}", file_url="https://safebooru.org//x", state="done"))
            session.flush()
            face = ready_face(start + i, f"faces/{start + i}.png", split, tag, LabelSource.tag)
            session.add(face)
            session.flush()
            ids.append(face.id)
    return ids


def test_a_small_class_gets_its_test_faces_back_and_none_leave_train(service_env) -> None:
    # issue 19: 14 labelled faces, 9 of them in test by the hash rule, 5 in train
    small = faces(["train"] * 5 + ["test"] * 9, "small", 1000)
    faces(["train"] * 85 + ["test"] * 15, "big", 2000)
    faces(["train"] * 30 + ["test"] * 6, "mid", 4000)  # 16.7%: near enough, left alone
    faces(["train"] * 12 + ["test"] * 8, "skewed", 5000)  # 40%: redone
    with session_scope() as session:  # a near-duplicate of a test face, labelled by hand
        session.add(Post(id=3000, md5=f"{3000:032x}", file_url="https://safebooru.org//x", state="done"))
        session.flush()
        dup = ready_face(3000, "faces/dup.png", "test", "small", LabelSource.manual)
        dup.duplicate_of = small[-1]
        session.add(dup)
        session.flush()
        dup_id = dup.id
    settings = get_settings()
    result = rebalance_splits(settings)
    with session_scope() as session:
        counts = split_counts(session)
        rows = {f.id: f.split for f in session.exec(select(Face)).all()}
    # 15 faces: 2 may stay in test, 13 train (>= WAIFU_MIN_TRAIN_FACES); the big class is untouched
    assert counts["small"] == {"train": 13, "test": 2}
    assert counts["big"] == {"train": 85, "test": 15}
    assert counts["mid"] == {"train": 30, "test": 6}
    assert counts["skewed"] == {"train": 17, "test": 3}
    assert result["characters"] == {"small": 8, "skewed": 5}
    assert all(rows[i] == Split.train for i in small[:5])  # trained-on faces stayed
    assert rows[small[-1]] == rows[dup_id]  # the duplicate moved with its original
    # stable: a second run moves nothing, and nothing went from train to test
    assert rebalance_splits(settings)["moved"] == 0


def test_class_weights_balance_up_to_the_cap() -> None:
    labels = np.array([0] * 100 + [1] * 20 + [2] * 2)
    w = class_weights(labels, 4, 10.0)
    assert w[1] / w[0] == 5.0 and w[2] / w[0] == 10.0  # 50x smaller class: capped at 10x
    assert w[3] == 0.0
    assert abs((w[labels]).mean() - 1.0) < 1e-9
    assert np.all(class_weights(labels, 4, 1.0) == 1.0)
