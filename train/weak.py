"""Weak supervision: more labels from the posts' tags, and doubt about the labels the tags gave.

Design notes: docs/architecture.md, `train/weak.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sqlmodel import col, select

from core.logs import kv
from core.settings import Settings
from crop.rules import inferred_pairs
from db.engine import session_scope
from db.models import Character, Face, FaceState, LabelSource, PostCharacter, utcnow
from train.registry import current_version

log = logging.getLogger("waifu.weak")

# chosen with bench/inferred.py (see README, "Inferred and doubtful labels")
INFER_MIN_MARGIN = 0.4  # of total probability lost without the pair
INFER_MIN_PROBABILITY = 0.6  # the face's own probability for the character
DOUBT_MIN_PROBABILITY = 0.8
DOUBT_FOLDS = 5
DOUBT_MIN_PER_CLASS = 5  # a character with fewer train faces is neither modelled nor judged
DOUBT_C = 0.1  # stronger than the classifier's 0.03: fewer faces per fold, judged one at a time
CHUNK = 500  # ids per IN (...) and faces per prediction batch
OPEN = (LabelSource.ambiguous.value, LabelSource.inferred.value)  # what inference may (re)write


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ------------------------------------------------------------------------------ inferred ----
def infer_labels(
    settings: Settings,
    min_margin: float = INFER_MIN_MARGIN,
    min_probability: float = INFER_MIN_PROBABILITY,
    classifier: Any = None,
) -> dict[str, Any]:
    """Recomputes every inferred label with the current model (or `classifier`); returns counts."""
    from train.features import load_images
    from train.model import load_artifacts, predict

    with session_scope(readonly=True) as session:
        version = current_version(session)
        version_id = version.id if version else None
        artifact_dir = version.artifact_dir if version else None
        posts = _open_posts(session)
        previous = set(session.exec(select(Face.id).where(Face.label_source == LabelSource.inferred)).all())
    counts: dict[str, Any] = {
        "model": version_id,
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
    if classifier is None:
        if not artifact_dir:
            counts["reason"] = "no current model: inferred labels left as they are"
            log.info(kv("inference skipped", reason=counts["reason"]))
            return counts
        classifier = load_artifacts(settings.data_dir / artifact_dir)
    known = {name: i for i, name in enumerate(classifier.class_names)}

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
    paths = {face_id: path for faces, _ in posts for face_id, _, _, _, path in faces}

    decided: dict[int, tuple[str, float]] = {}
    batch: list[tuple[list[int], list[str]]] = []
    for index, item in enumerate(work):
        batch.append(item)
        if sum(len(ids) for ids, _ in batch) >= CHUNK or index == len(work) - 1:
            ids = [face_id for face_ids, _ in batch for face_id in face_ids]
            images = load_images([str(settings.data_dir / paths[i]) for i in ids], settings.face_size)
            probabilities = predict(classifier, images)
            row = dict(zip(ids, probabilities, strict=True))
            for face_ids, characters in batch:
                scores = np.stack([row[i][[known[c] for c in characters]] for i in face_ids])
                for face, character, margin in inferred_pairs(scores, min_margin, min_probability):
                    decided[face_ids[face]] = (characters[character], float(margin))
            counts["faces_scored"] += len(ids)
            batch = []
    counts["posts"] = len(work)

    # write: only faces that are still open to inference (a person may have labelled one meanwhile)
    now = utcnow()
    touched = sorted(set(decided) | previous)
    for ids in _chunks(touched):
        with session_scope() as session:
            for face in session.exec(select(Face).where(col(Face.id).in_(ids)).with_for_update()).all():
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
            select(Face.post_id, Face.id, Face.state, Face.label, Face.label_source, Face.path)
            .where(col(Face.post_id).in_(chunk))
            .order_by(Face.id)
        ).all():
            faces.setdefault(row[0], []).append(tuple(row[1:]))
        tags: dict[int, list[str]] = {}
        for post_id, tag in session.exec(
            select(PostCharacter.post_id, Character.tag)
            .join(Character, Character.id == PostCharacter.character_id)
            .where(col(PostCharacter.post_id).in_(chunk))
            .order_by(Character.tag)
        ).all():
            tags.setdefault(post_id, []).append(tag)
        posts += [(faces[p], sorted(set(tags[p]))) for p in chunk if p in tags and p in faces]
    return posts


# ------------------------------------------------------------------------------- doubtful ----
def doubt_probabilities(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    num_classes: int,
    judge: np.ndarray | None = None,
    folds: int = DOUBT_FOLDS,
    C: float = DOUBT_C,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Out-of-fold class probabilities for every training row (a model never fitted on that row, nor on
    a row of its group), and, for the rows of `judge`, probabilities from a model fitted on all of them."""
    from sklearn.model_selection import StratifiedGroupKFold

    counts = np.bincount(labels, minlength=num_classes)
    splits = int(min(folds, counts[counts > 0].min()))
    if splits < 2:
        raise ValueError("every class needs at least 2 faces for out-of-fold predictions")
    out = np.zeros((len(labels), num_classes))
    for fit_rows, held in StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=0).split(
        features, labels, groups
    ):
        if len(np.unique(labels[fit_rows])) < 2:  # near-duplicate groups left one class: no judgement
            out[held] = labels_onehot(labels[held], num_classes)
            continue
        out[held] = _fit(features[fit_rows], labels[fit_rows], num_classes, C)(features[held])
    judged = _fit(features, labels, num_classes, C)(judge) if judge is not None and len(judge) else None
    return out, judged


def labels_onehot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Probability 1 for the label itself: a row nothing could judge is never doubtful."""
    return np.eye(num_classes)[labels]


def _fit(x: np.ndarray, y: np.ndarray, num_classes: int, C: float):
    """The classifier's own linear model (train.features.fit_linear), classes weighted to equal total
    weight (as scikit-learn's class_weight="balanced"): a small class is judged as fairly as a big one."""
    from train.features import fit_linear, softmax

    counts = np.bincount(y, minlength=num_classes)
    present = int((counts > 0).sum())
    weight = len(y) / (present * counts[y])
    model = fit_linear(x, y, num_classes, C, sample_weight=weight)
    return lambda z: softmax(model.logits(z))


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
    settings: Settings, min_probability: float = DOUBT_MIN_PROBABILITY, folds: int = DOUBT_FOLDS
) -> dict[str, Any]:
    """Recomputes the doubt of every `tag` face (see the module's doc); returns counts."""
    from train.features import FeatureConfig, extract, load_images

    with session_scope(readonly=True) as session:
        rows = session.exec(
            select(Face.id, Face.label, Face.label_source, Face.split, Face.path, Face.duplicate_of)
            .where(
                Face.state == FaceState.ready,
                col(Face.label).is_not(None),
                col(Face.label_source).in_([LabelSource.tag, LabelSource.manual]),
            )
            .order_by(Face.id)
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
        config = FeatureConfig()

        def features(selected: list) -> np.ndarray:
            parts = [
                extract(load_images([str(settings.data_dir / r[4]) for r in chunk], settings.face_size), config)
                for chunk in _chunks(selected)
            ]
            return np.concatenate(parts) if parts else np.zeros((0, 1))

        x_train, x_test = features(train_rows), features(test_rows)
        y = np.array([index[r[1]] for r in train_rows])
        groups = np.array([r[5] or r[0] for r in train_rows])  # a near-duplicate stays with its original
        oof, judged = doubt_probabilities(
            x_train, y, groups, len(class_names), x_test if len(test_rows) else None, folds
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
                decision = decisions.get(face.id)
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
