"""Faces as arrays: datasets from (path, label) pairs or folders, and the stratified validation split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from train.features import load_images


@dataclass
class Dataset:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int, index into class_names
    class_names: list[str]
    paths: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(self.class_names)}


def load_dataset(
    items: Sequence[tuple[str | Path, str]], class_names: Sequence[str] | None = None, size: int = 96
) -> Dataset:
    """Faces from (path, label) pairs. Pass the training class_names when loading a test split."""
    names = list(class_names) if class_names is not None else sorted({label for _, label in items})
    index = {n: i for i, n in enumerate(names)}
    kept = [(str(p), index[label]) for p, label in items if label in index]
    images = load_images([p for p, _ in kept], size)
    return Dataset(images, np.array([y for _, y in kept], dtype=np.int64), names, [p for p, _ in kept])


def items_from_dir(root: str | Path) -> list[tuple[Path, str]]:
    """(path, label) pairs from a root/<label>/<image> tree, like the shared crops."""
    exts = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
    return [
        (f, d.name)
        for d in sorted(Path(root).iterdir())
        if d.is_dir()
        for f in sorted(d.iterdir())
        if f.suffix.lower() in exts
    ]


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation): about `fraction` of each class, at least one, never a class's only face."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(max(1, round(fraction * len(idx))), len(idx) - 1) if fraction > 0 else 0
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def class_weights(labels: np.ndarray, num_classes: int, cap: float) -> np.ndarray:
    """A weight per class for the training loss: a class with fewer faces weighs more, as if it had as many
    as the largest, but at most `cap` times a face of the largest class (cap <= 1: all 1). Normalised so that
    the average face weighs 1 (the loss keeps its scale)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if cap <= 1 or len(labels) == 0:
        return np.ones(num_classes)
    weights = np.where(counts > 0, np.minimum(cap, counts.max() / np.maximum(counts, 1)), 0.0)
    return weights * len(labels) / float((weights * counts).sum())
