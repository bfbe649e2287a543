"""Weak supervision: more labels from the posts' tags, and doubt about the labels the tags gave.

Pure over what a model gives: `infer_labels` takes a `Scorer` (class names and a function of face paths to
probabilities), `flag_doubtful_tags` an `OutOfFold` function; train/weak_inputs.py builds both from the
models. Design notes: docs/architecture.md, "Inferred and doubtful labels".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlmodel import col, select

from core.logs import kv
from core.settings import Settings
from db.engine import session_scope
from db.models import Character, Face, FaceState, LabelSource, PostCharacter, pk, utcnow
from labels.rules import inferred_pairs

log = logging.getLogger("waifu.weak")

# chosen with bench/inferred.py (see README, "Inferred and doubtful labels")
INFER_MIN_MARGIN = 0.4  # of total probability lost without the pair
INFER_MIN_PROBABILITY = 0.6  # the face's own probability for the character
DOUBT_MIN_PROBABILITY = 0.8
DOUBT_FOLDS = 5
DOUBT_MIN_PER_CLASS = 5  # a character with fewer train faces is neither modelled nor judged
CHUNK = 500  # ids per IN (...) and faces per prediction batch
OPEN = (LabelSource.ambiguous.value, LabelSource.inferred.value)  # what inference may (re)write


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ------------------------------------------------------------------------------ inferred ----
@dataclass
class Scorer:
    """A model as inference sees it: its version id, its class names, and probabilities (faces x classes)
    for a list of face image paths."""

    model: int | None
    class_names: Sequence[str]
    probabilities: Callable[[list[str]], np.ndarray]


def infer_labels(
    settings: Settings,
    scorer: Scorer | None,
    min_margin: float = INFER_MIN_MARGIN,
    min_probability: float = INFER_MIN_PROBABILITY,
) -> dict[str, Any]:
    """Recomputes every inferred label with `scorer` (None: no model, labels left as they are); returns
    counts."""
    with session_scope(readonly=True) as session:
        posts = _open_posts(session)
        inferred = session.exec(select(Face.id).where(Face.label_source == LabelSource.inferred)).all()
        previous = {face_id for face_id in inferred if face_id is not None}
    counts: dict[str, Any] = {
        "model": scorer.model if scorer else None,
        "min_margin": min_margin,
        "min_probability": min_probability,
        "posts": 0,
        "faces_scored": 0,
        "inferred": 0,
        "new": 0,
        "relabelled": 0,
        "reverted": 0,
        "kept_manual": 0,
    }
    if scorer is None:
        counts["reason"] = "no current model: inferred labels left as they are"
        log.info(kv("inference skipped", reason=counts["reason"]))
        return counts
    known = {name: i for i, name in enumerate(scorer.class_names)}

    # which posts can be judged: every face cropped, every remaining character known to the model
    work: list[tuple[list[int], list[str]]] = []  # (candidate face ids, characters) per post
    for faces, tags in posts:
        if any(state == FaceState.detected for _, state, _, _, _ in faces):
            continue  # not every face is cropped yet
        taken = {
            label for _, state, label, source, _ in faces if state == FaceState.ready and source not in OPEN and label
        }
        characters = [t for t in tags if t not in taken]
        candidates = [face_id for face_id, state, _, source, _ in faces if state == FaceState.ready and source in OPEN]
        if not characters or len(candidates) < 2 or any(t not in known for t in characters):
            continue
        work.append((candidates, characters))
    paths = {face_id: path for faces, _ in posts for face_id, _, _, _, path in faces if path}  # candidates are cropped

    decided: dict[int, tuple[str, float]] = {}
    batch: list[tuple[list[int], list[str]]] = []
    for index, item in enumerate(work):
        batch.append(item)
        if sum(len(ids) for ids, _ in batch) >= CHUNK or index == len(work) - 1:
            ids = [face_id for face_ids, _ in batch for face_id in face_ids]
            probabilities = scorer.probabilities([str(settings.data_dir / paths[i]) for i in ids])
            row = dict(zip(ids, probabilities, strict=True))
            for face_ids, characters in batch:
                scores = np.stack([row[i][[known[c] for c in characters]] for i in face_ids])
                for index, character, margin in inferred_pairs(scores, min_margin, min_probability):
                    decided[face_ids[index]] = (characters[character], float(margin))
            counts["faces_scored"] += len(ids)
            batch = []
    counts["posts"] = len(work)

    # write: only faces that are still open to inference (a person may have labelled one meanwhile)
    now = utcnow()
    touched = sorted(set(decided) | previous)
    for chunk in _chunks(touched):
        with session_scope() as session:
            for face in session.exec(select(Face).where(col(Face.id).in_(chunk)).with_for_update()).all():
                if face.state != FaceState.ready or face.label_source not in OPEN:
                    counts["kept_manual"] += face.id in decided
                    continue
                if face.id in decided:
                    label, margin = decided[face.id]
                    if face.label_source != LabelSource.inferred:
                        counts["new"] += 1
                    elif face.label != label:
                        counts["relabelled"] += 1
                    face.label, face.label_source, face.inferred_margin = label, LabelSource.inferred, margin
                    counts["inferred"] += 1
                else:
                    face.label, face.label_source, face.inferred_margin = None, LabelSource.ambiguous, None
                    counts["reverted"] += 1
                face.updated_at = now
    log.info(kv("labels inferred", **{k: v for k, v in counts.items() if k != "reason"}))
    return counts


def _open_posts(session) -> list[tuple[list[tuple[int, str, str | None, str | None, str | None]], list[str]]]:
    """Posts with a ready face open to inference: (every face of the post as (id, state, label, source,
    path), the post's tracked characters sorted)."""
    post_ids = sorted(
        set(
            session.exec(
                select(Face.post_id).where(Face.state == FaceState.ready, col(Face.label_source).in_(OPEN))
            ).all()
        )
    )
    posts = []
    for chunk in _chunks(post_ids):
        faces: dict[int, list] = {}
        for row in session.exec(
            select(  # type: ignore[call-overload]  # sqlmodel's select() is typed for at most 4 columns
                Face.post_id, Face.id, Face.state, Face.label, Face.label_source, Face.path
            )
            .where(col(Face.post_id).in_(chunk))
            .order_by(col(Face.id))
        ).all():
            faces.setdefault(row[0], []).append(tuple(row[1:]))
        tags: dict[int, list[str]] = {}
        for post_id, tag in session.exec(
            select(PostCharacter.post_id, Character.tag)
            .join(Character, col(Character.id) == PostCharacter.character_id)
            .where(col(PostCharacter.post_id).in_(chunk))
            .order_by(col(Character.tag))
        ).all():
            tags.setdefault(post_id, []).append(tag)
        posts += [(faces[p], sorted(set(tags[p]))) for p in chunk if p in tags and p in faces]
    return posts


# ------------------------------------------------------------------------------- doubtful ----
# (train paths, train labels, groups, number of classes, test paths, folds) -> (out-of-fold probabilities of
# the train rows, probabilities of the test rows from a model fitted on all train rows, or None)
OutOfFold = Callable[[list[str], np.ndarray, np.ndarray, int, list[str], int], tuple[np.ndarray, np.ndarray | None]]


def labels_onehot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Probability 1 for the label itself: a row nothing could judge is never doubtful."""
    return np.eye(num_classes)[labels]


def doubt_for(
    probabilities: np.ndarray, label: int, class_names: Sequence[str], min_probability: float
) -> tuple[str, float] | None:
    """(reason, score) when the model calls the face another character with at least `min_probability`."""
    other = int(np.argmax(probabilities))
    p = float(probabilities[other])
    if other == label or p < min_probability:
        return None
    return (
        f"a model trained without this face calls it {class_names[other]} ({p:.2f}; "
        f"{class_names[label]} {float(probabilities[label]):.2f})",
        p,
    )


def flag_doubtful_tags(
    settings: Settings,
    out_of_fold: OutOfFold,
    min_probability: float = DOUBT_MIN_PROBABILITY,
    folds: int = DOUBT_FOLDS,
) -> dict[str, Any]:
    """Recomputes the doubt of every `tag` face: a face `out_of_fold` (a model never fitted on it) calls
    another character with at least `min_probability` is doubtful. Returns counts."""
    with session_scope(readonly=True) as session:
        rows = session.exec(
            select(  # type: ignore[call-overload,misc]  # sqlmodel's select() is typed for at most 4 columns
                Face.id, Face.label, Face.label_source, Face.split, Face.path, Face.duplicate_of
            )
            .where(
                Face.state == FaceState.ready,
                col(Face.label).is_not(None),
                col(Face.label_source).in_([LabelSource.tag, LabelSource.manual]),
            )
            .order_by(col(Face.id))
        ).all()
        flagged_before = set(session.exec(select(Face.id).where(col(Face.doubt_score).is_not(None))).all())
    per_class: dict[str, int] = {}
    for _, label, _, split, _, _ in rows:
        if split == "train":
            per_class[label] = per_class.get(label, 0) + 1
    class_names = sorted(c for c, n in per_class.items() if n >= DOUBT_MIN_PER_CLASS)
    index = {c: i for i, c in enumerate(class_names)}
    train_rows = [r for r in rows if r[3] == "train" and r[1] in index]
    test_rows = [r for r in rows if r[3] != "train" and r[1] in index and r[2] == LabelSource.tag]
    counts: dict[str, Any] = {
        "min_probability": min_probability,
        "classes": len(class_names),
        "judged": 0,
        "doubtful": 0,
        "cleared": 0,
    }
    decisions: dict[int, tuple[str, float] | None] = {}
    if len(class_names) >= 2:
        y = np.array([index[r[1]] for r in train_rows])
        groups = np.array([r[5] or r[0] for r in train_rows])  # a near-duplicate stays with its original
        oof, judged = out_of_fold(
            [str(settings.data_dir / r[4]) for r in train_rows],
            y,
            groups,
            len(class_names),
            [str(settings.data_dir / r[4]) for r in test_rows],
            folds,
        )
        for r, p in zip(train_rows, oof, strict=True):
            if r[2] == LabelSource.tag:
                decisions[r[0]] = doubt_for(p, index[r[1]], class_names, min_probability)
        for r, p in zip(test_rows, judged if judged is not None else [], strict=True):
            decisions[r[0]] = doubt_for(p, index[r[1]], class_names, min_probability)
    else:
        counts["reason"] = f"need 2 characters with >= {DOUBT_MIN_PER_CLASS} train faces to judge tag labels"
    counts["judged"] = len(decisions)

    # write: a face that is no longer a tag face, or was never judged this time, loses its doubt
    labels = {r[0]: r[1] for r in rows}
    now = utcnow()
    for ids in _chunks(sorted(set(decisions) | flagged_before)):
        with session_scope() as session:
            for face in session.exec(select(Face).where(col(Face.id).in_(ids)).with_for_update()).all():
                decision = decisions.get(pk(face))
                if face.label_source != LabelSource.tag or face.label != labels.get(face.id):
                    decision = None  # relabelled meanwhile: nothing this run judged applies to it
                reason, score = decision if decision else (None, None)
                if (face.doubt, face.doubt_score) == (reason, score):
                    counts["doubtful"] += reason is not None
                    continue
                counts["cleared"] += reason is None
                counts["doubtful"] += reason is not None
                face.doubt, face.doubt_score, face.updated_at = reason, score, now
    log.info(kv("tag labels judged", **{k: v for k, v in counts.items() if k != "reason"}))
    return counts
