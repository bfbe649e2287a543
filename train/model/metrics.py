"""Evaluation on a test split: accuracy, macro-F1, per class, confusion, and the unknown rule's effect."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from train.model.classifier import Classifier, predict
from train.model.data import Dataset


@dataclass
class Metrics:
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]  # name -> precision, recall, f1, support
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    class_names: list[str]
    n: int
    unknown: dict[str, Any] = field(default_factory=dict)  # threshold, how chosen, share called unknown

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metrics_from_predictions(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> Metrics:
    k = len(class_names)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    tp = np.diag(cm).astype(float)
    pred_n, true_n = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, pred_n, out=np.zeros(k), where=pred_n > 0)
    recall = np.divide(tp, true_n, out=np.zeros(k), where=true_n > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = true_n > 0  # macro-F1 over the classes the test split has, like scikit-learn's labels=present
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(true_n[i])}
        for i, name in enumerate(class_names)
    }  # fmt: skip
    n = int(cm.sum())
    return Metrics(
        accuracy=float(tp.sum() / n) if n else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        per_class=per_class,
        confusion=cm.tolist(),
        class_names=list(class_names),
        n=n,
    )


def unknown_summary(classifier: Classifier, probabilities: np.ndarray, y_true: np.ndarray | None = None) -> dict:
    """The threshold, how it was chosen, and what it does to these faces."""
    info = classifier.info
    named = probabilities.max(1) >= classifier.threshold if len(probabilities) else np.zeros(0, bool)
    out: dict[str, Any] = {
        "threshold": classifier.threshold,
        "percentile": classifier.config.unknown_percentile,
        "rule": info.get("threshold_rule", "none recorded"),
        "threshold_by_percentile": info.get("threshold_by_percentile", {}),
        "share_unknown": float((~named).mean()) if len(named) else 0.0,
    }
    if y_true is not None and len(named):
        right = named & (probabilities.argmax(1) == y_true)
        out["named_right"] = float(right.mean())
        out["named_wrong"] = float((named & ~right).mean())
    return out


def evaluate(classifier: Classifier, test_set: Dataset, tta: bool | None = None) -> Metrics:
    """Accuracy (best guess, threshold ignored), macro-F1, per class, confusion, and the unknown rule's effect."""
    if list(test_set.class_names) != list(classifier.class_names):
        raise ValueError("test set class names differ from the model's: load it with the model's class_names")
    p = predict(classifier, test_set.images, tta=tta)
    metrics = metrics_from_predictions(test_set.labels, p.argmax(1), classifier.class_names)
    metrics.unknown = unknown_summary(classifier, p, test_set.labels)
    return metrics
