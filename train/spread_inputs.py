"""Inferred labels from label spreading (labels.spreading) held to the posts' tags, with the current model's
probabilities as the prior: what the retrain runs after each fit (measured in bench/spreading.py, figures
in docs/model.md, "Label spreading").

The graph holds the collection's seeds (tag and manual labels in the train split that nobody doubts, at
most `MAX_SEEDS_PER_CLASS` per character) and every face labels.weak.infer_labels would judge; each face's
classical features (train.features) place it. The result goes to labels.weak.infer_labels as a `Scorer`
whose probabilities are the spread scores, with the thresholds chosen for them.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sqlmodel import col, select

from core.logs import kv
from core.settings import Settings
from db.engine import session_scope
from db.models import Face, FaceState, LabelSource
from labels.spreading import SPREAD_MIN_MARGIN, SPREAD_MIN_SCORE, SpreadConfig, spread_with_posts
from labels.weak import CHUNK, OPEN, Scorer, _open_posts, infer_labels
from train.weak_inputs import scorer_for

log = logging.getLogger("waifu.weak")

MAX_SEEDS_PER_CLASS = 300  # more seeds of one character add little to the graph and cost features
MAX_FACES = 30_000  # seeds + open faces; above it the model alone infers (features: ~14 KB a face)


def infer_with_spreading(settings: Settings, classifier: Any = None) -> dict[str, Any]:
    """labels.weak.infer_labels with the current model's probabilities spread over the faces' graph."""
    scorer = scorer_for(settings, classifier)
    spread = spreading_scorer(settings, scorer) if scorer is not None else None
    if spread is None:
        from labels.weak import INFER_MIN_MARGIN, INFER_MIN_PROBABILITY

        return infer_labels(settings, scorer, INFER_MIN_MARGIN, INFER_MIN_PROBABILITY)
    counts = infer_labels(settings, spread, SPREAD_MIN_MARGIN, SPREAD_MIN_SCORE)
    counts["spreading"] = True
    return counts


def spreading_scorer(settings: Settings, scorer: Scorer, config: SpreadConfig | None = None) -> Scorer | None:
    """`scorer` with its probabilities replaced by spread scores for every face inference will ask about;
    None when there is nothing to spread from or too much to hold (then the model alone decides)."""
    from train.features import FeatureConfig, extract, load_images

    known = {name: i for i, name in enumerate(scorer.class_names)}
    with session_scope(readonly=True) as session:
        seed_rows = session.exec(
            select(Face.path, Face.label)
            .where(
                Face.state == FaceState.ready,
                col(Face.label_source).in_([LabelSource.tag, LabelSource.manual]),
                col(Face.doubt_score).is_(None),
                col(Face.label).is_not(None),
                Face.split == "train",
            )
            .order_by(col(Face.id))
        ).all()
        posts = _open_posts(session)  # the posts infer_labels judges, read the same way
    per_class: dict[str, int] = {}
    seeds = []
    for path, label in seed_rows:
        if path and label in known and per_class.get(label, 0) < MAX_SEEDS_PER_CLASS:
            per_class[label] = per_class.get(label, 0) + 1
            seeds.append((path, known[label]))
    # the faces and characters of each post as labels.weak.infer_labels chooses them
    work: list[tuple[list[str], list[int]]] = []
    for faces, tags in posts:
        if any(state == FaceState.detected for _, state, _, _, _ in faces):
            continue
        taken = {label for _, state, label, source, _ in faces if state == FaceState.ready and source not in OPEN}
        characters = [t for t in tags if t not in taken]
        candidates = [
            path for _, state, _, source, path in faces if state == FaceState.ready and source in OPEN and path
        ]
        if characters and len(candidates) >= 2 and all(t in known for t in characters):
            work.append((candidates, [known[t] for t in characters]))
    open_paths = sorted({p for paths, _ in work for p in paths})
    reason = ""
    if len(per_class) < 2 or not open_paths:
        reason = "nothing to spread: need seeds of 2 characters and faces to judge"
    elif len(seeds) + len(open_paths) > MAX_FACES:
        reason = f"{len(seeds) + len(open_paths)} faces is over {MAX_FACES}: the model alone infers"
    if reason:
        log.info(kv("spreading skipped", reason=reason))
        return None

    feature_config = FeatureConfig()
    all_paths = [p for p, _ in seeds] + open_paths
    features, prior = [], [np.eye(len(known))[[c for _, c in seeds]]]
    for start in range(0, len(all_paths), CHUNK):
        chunk = [str(settings.data_dir / p) for p in all_paths[start : start + CHUNK]]
        features.append(extract(load_images(chunk, settings.face_size), feature_config))
    for start in range(0, len(open_paths), CHUNK):
        prior.append(scorer.probabilities([str(settings.data_dir / p) for p in open_paths[start : start + CHUNK]]))
    row = {p: len(seeds) + i for i, p in enumerate(open_paths)}
    scores = spread_with_posts(
        np.concatenate(features),
        np.array([c for _, c in seeds] + [-1] * len(open_paths)),
        len(known),
        [([row[p] for p in paths], classes) for paths, classes in work],
        np.concatenate(prior),
        config,
    )
    by_path = {str(settings.data_dir / p): scores[row[p]] for p in open_paths}
    log.info(kv("labels spread", seeds=len(seeds), faces=len(open_paths), posts=len(work)))

    def probabilities(paths: list[str]) -> np.ndarray:
        missing = [p for p in paths if p not in by_path]
        if missing:  # a face cropped since: the model's own probabilities
            by_path.update(zip(missing, scorer.probabilities(missing), strict=True))
        return np.stack([by_path[p] for p in paths]) if paths else np.zeros((0, len(known)))

    return Scorer(scorer.model, scorer.class_names, probabilities)
