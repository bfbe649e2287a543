"""Calibration of the ensemble on validation faces: temperatures, the CNN's share, the unknown threshold."""

from __future__ import annotations

import numpy as np

from train.features import softmax


def _nll(p: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None)).mean())


def sharpen(p: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling of probabilities: softmax(log p / T)."""
    if temperature == 1.0:
        return p
    return softmax(np.log(np.clip(p, 1e-12, None)) / temperature)


def fit_temperature(p: np.ndarray, labels: np.ndarray) -> float:
    """The T in 0.2..5 (log grid) with the lowest validation log-loss."""
    grid = np.exp(np.linspace(np.log(0.2), np.log(5.0), 61))
    return float(grid[int(np.argmin([_nll(sharpen(p, t), labels) for t in grid]))])


def choose_weight(p_cnn: np.ndarray, p_cls: np.ndarray, labels: np.ndarray) -> float:
    """The CNN share (0..1, step 0.05) with the best validation accuracy of the calibrated average;
    ties go to the lower log-loss (on split halves this rule lost nothing against the best fixed weight,
    while a pure log-loss choice lost 1.5 points: FINDINGS.md)."""
    best_w, best = 0.5, (-1.0, 0.0)
    for w in np.linspace(0, 1, 21):
        p = w * p_cnn + (1 - w) * p_cls
        score = (float((p.argmax(1) == labels).mean()), -_nll(p, labels))
        if score > best:
            best_w, best = float(w), score
    return best_w


def unknown_threshold(proba: np.ndarray, labels: np.ndarray, percentile: float) -> float:
    """The `percentile`-th percentile of the best probability over held-out faces named correctly: about
    that share of known faces is then called unknown, while faces of unseen characters (spread over
    look-alikes) mostly score lower."""
    correct = proba.argmax(1) == labels
    top = proba.max(1)[correct] if correct.any() else proba.max(1)
    return float(np.percentile(top, percentile)) if len(top) else 0.0
