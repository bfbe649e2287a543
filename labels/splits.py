"""Splits per character: how many train and test faces each character has, which characters are short of
them, and the move that gives a character under the minimum of training faces (or with far too many test
faces) test faces back to training, down to labels.rules.allowed_test_faces: test -> train only, with
near-duplicates, so a face once trained on never goes to test. The retrain runs it first."""

from __future__ import annotations

import logging
from typing import Any

from sqlmodel import Session, col, func, or_, select

from core.logs import kv
from core.settings import Settings
from db.engine import session_scope
from db.models import Character, Face, FaceState, LabelSource, Post, PostCharacter, PostState, Split, utcnow
from labels.rules import allowed_test_faces

log = logging.getLogger("waifu.splits")

COUNTED = (LabelSource.tag, LabelSource.manual)  # what the split is stratified over (trained and evaluated on)


def _counted():
    return (
        Face.state == FaceState.ready,
        col(Face.label).is_not(None),
        col(Face.label_source).in_(COUNTED),
        col(Face.doubt_score).is_(None),
    )


def character_splits(session: Session, tag: str) -> tuple[int, int]:
    """(train, test) labelled faces of one character."""
    rows = dict(
        session.exec(
            select(Face.split, func.count()).where(*_counted(), Face.label == tag).group_by(col(Face.split))
        ).all()
    )
    return int(rows.get(Split.train, 0)), int(rows.get(Split.test, 0))


def split_counts(session: Session) -> dict[str, dict[str, int]]:
    """{character: {"train": n, "test": n}} over the labelled faces (tag and manual, not doubtful)."""
    out: dict[str, dict[str, int]] = {}
    for label, split, n in session.exec(
        select(Face.label, Face.split, func.count()).where(*_counted()).group_by(col(Face.label), col(Face.split))
    ).all():
        if label is None:  # _counted() takes labelled faces only
            continue
        out.setdefault(label, {"train": 0, "test": 0})[split or "train"] += int(n)
    return out


def needs_rebalance(train: int, test: int, test_fraction: float, min_train: int) -> bool:
    """A character's split is redone when it has test faces but fewer than `min_train` training faces, or
    more than twice `test_fraction` of its faces in test; a share near the fraction is left alone (moving
    one face back and forth for rounding would only churn today's test split)."""
    return test > 0 and (train < min_train or test > 2 * test_fraction * (train + test))


def rebalance_splits(settings: Settings) -> dict[str, Any]:
    """Moves test faces to train for every character over its allowed test count (newest first, each with
    its near-duplicates), one short transaction per character. Returns {"moved": n, "characters": {...}}."""
    with session_scope(readonly=True) as session:
        counts = split_counts(session)
    moved: dict[str, int] = {}
    for tag, n in sorted(counts.items()):
        fraction, minimum = settings.test_fraction, settings.min_train_faces
        if not needs_rebalance(n["train"], n["test"], fraction, minimum):
            continue
        excess = n["test"] - allowed_test_faces(n["train"] + n["test"], fraction, minimum)
        with session_scope() as session:
            now, done = utcnow(), 0
            candidates = session.exec(
                select(Face)
                .where(*_counted(), Face.label == tag, Face.split == Split.test)
                .order_by(col(Face.id).desc())
            ).all()
            for face in candidates:
                if done >= excess:
                    break
                if face.split != Split.test:
                    continue  # moved already with its group
                root = face.duplicate_of or face.id
                group = session.exec(
                    select(Face).where(or_(Face.id == root, Face.duplicate_of == root)).with_for_update()
                ).all()
                for member in group:
                    if member.split == Split.test:
                        member.split, member.updated_at = Split.train, now
                        done += member.label == tag and member.label_source in COUNTED and member.doubt_score is None
            moved[tag] = int(done)
    if moved:
        log.info(kv("splits rebalanced", moved=sum(moved.values()), characters=len(moved)))
    return {"moved": sum(moved.values()), "characters": moved}


IN_FLIGHT = (PostState.discovered, PostState.downloaded, PostState.detected)  # posts whose faces may still come


def short_of_faces(session: Session, settings: Settings) -> set[tuple[str, str]]:
    """(site, tag) of every tracked character with fewer than WAIFU_MIN_TRAIN_FACES labelled training faces
    and no post still in the pipeline: collecting deeper is what would help it (the poller's deeper
    backfill). One with posts in flight waits for their faces first, so a walk never runs ahead of the
    pipeline."""
    counts = split_counts(session)
    in_flight = set(
        session.exec(
            select(PostCharacter.character_id)
            .join(Post, col(Post.id) == PostCharacter.post_id)
            .where(col(Post.state).in_(IN_FLIGHT))
            .distinct()
        ).all()
    )
    return {
        (c.site, c.tag)
        for c in session.exec(select(Character)).all()
        if c.id not in in_flight and counts.get(c.tag, {}).get("train", 0) < settings.min_train_faces
    }
