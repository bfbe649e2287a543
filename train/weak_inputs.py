"""What labels.weak needs from the models: the current classifier as a `Scorer` for inferred labels, and
out-of-fold probabilities of the classical features for doubtful tag labels. `infer_with_model` and
`judge_tag_labels` run the two passes as a retrain does."""

from __future__ import annotations

from typing import Any

import numpy as np

from core.settings import Settings
from db.engine import session_scope
from labels.weak import (
    CHUNK,
    DOUBT_FOLDS,
    DOUBT_MIN_PROBABILITY,
    INFER_MIN_MARGIN,
    INFER_MIN_PROBABILITY,
    Scorer,
    flag_doubtful_tags,
    infer_labels,
    labels_onehot,
)
from train.registry import current_version

DOUBT_C = 0.1  # stronger than the classifier's 0.03: fewer faces per fold, judged one at a time


def scorer_for(settings: Settings, classifier: Any = None) -> Scorer | None:
    """The current model (or `classifier`) as labels.weak scores faces with; None without a model."""
    from train.features import load_images
    from train.model import load_artifacts, predict

    with session_scope(readonly=True) as session:
        version = current_version(session)
        version_id = version.id if version else None
        artifact_dir = version.artifact_dir if version else None
    if classifier is None:
        if not artifact_dir:
            return None
        classifier = load_artifacts(settings.data_dir / artifact_dir)

    def probabilities(paths: list[str]) -> np.ndarray:
        return predict(classifier, load_images(paths, settings.face_size))

    return Scorer(version_id, list(classifier.class_names), probabilities)


def infer_with_model(
    settings: Settings,
    min_margin: float = INFER_MIN_MARGIN,
    min_probability: float = INFER_MIN_PROBABILITY,
    classifier: Any = None,
) -> dict[str, Any]:
    """labels.weak.infer_labels with the current model (or `classifier`)."""
    return infer_labels(settings, scorer_for(settings, classifier), min_margin, min_probability)


def judge_tag_labels(
    settings: Settings, min_probability: float = DOUBT_MIN_PROBABILITY, folds: int = DOUBT_FOLDS
) -> dict[str, Any]:
    """labels.weak.flag_doubtful_tags with the classical features' out-of-fold probabilities."""
    return flag_doubtful_tags(settings, features_out_of_fold(settings.face_size), min_probability, folds)


def features_out_of_fold(face_size: int):
    """An OutOfFold function (labels.weak) over the classical features of the faces' image files."""
    from train.features import FeatureConfig, extract, load_images

    config = FeatureConfig()

    def features(paths: list[str]) -> np.ndarray:
        parts = [extract(load_images(paths[i : i + CHUNK], face_size), config) for i in range(0, len(paths), CHUNK)]
        return np.concatenate(parts) if parts else np.zeros((0, 1))

    def out_of_fold(train_paths, labels, groups, num_classes, test_paths, folds):
        judge = features(test_paths) if test_paths else None
        return doubt_probabilities(features(train_paths), labels, groups, num_classes, judge, folds)

    return out_of_fold


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


def _fit(x: np.ndarray, y: np.ndarray, num_classes: int, C: float):
    """The classifier's own linear model (train.features.fit_linear), classes weighted to equal total
    weight (as scikit-learn's class_weight="balanced"): a small class is judged as fairly as a big one."""
    from train.features import fit_linear, softmax

    counts = np.bincount(y, minlength=num_classes)
    present = int((counts > 0).sum())
    weight = len(y) / (present * counts[y])
    model = fit_linear(x, y, num_classes, C, sample_weight=weight)
    return lambda z: softmax(model.logits(z))
