"""The trained classifier (CNN and/or classical part) and prediction with it: probabilities, names, top-k."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from train.features import FeatureConfig, LinearModel, extract, fit_linear, load_images, softmax
from train.model.calibration import sharpen
from train.model.config import UNKNOWN, TrainConfig


@dataclass
class Classifier:
    """What training produces and prediction uses: CNN and/or classical model, weights, threshold."""

    class_names: list[str]
    config: TrainConfig
    keras_model: Any | None = None
    linear: LinearModel | None = None
    cnn_weight: float = 1.0  # p = w * p_cnn + (1 - w) * p_classical
    threshold: float = 0.0  # best probability under which a face is "unknown"
    temperature_cnn: float = 1.0  # fitted on validation: p -> softmax(log p / T)
    temperature_classical: float = 1.0
    cnn_backbone: str = "resnet"
    cnn_size: int = 64
    info: dict[str, Any] = field(default_factory=dict)  # validation numbers, timings (for reports)
    _infer_fn: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def input_size(self) -> int:
        return self.cnn_size

    def cnn_proba(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """Uncalibrated CNN softmax, averaged with the mirror image (one call for both views)."""
        import tensorflow as tf

        tta = self.config.tta if tta is None else tta
        if self._infer_fn is None:
            model = self.keras_model
            if model is None:
                raise ValueError("this classifier has no CNN")
            # a traced call: model.predict() costs ~40 ms per call, this a few ms
            self._infer_fn = tf.function(lambda x: tf.nn.softmax(model(x, training=False)), reduce_retracing=True)
        x = _cnn_input(images, self.cnn_size)
        out = []
        for i in range(0, len(x), 128):
            chunk = x[i : i + 128]
            if tta:
                p = self._infer_fn(np.concatenate([chunk, chunk[:, :, ::-1]])).numpy()
                out.append((p[: len(chunk)] + p[len(chunk) :]) / 2)
            else:
                out.append(self._infer_fn(chunk).numpy())
        return np.concatenate(out)

    def classical_proba(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        tta = self.config.tta if tta is None else tta
        feats = _features(images, self.config.features, mirror=tta)
        if self.linear is None:
            raise ValueError("this classifier has no classical model")
        return _linear_proba(self.linear, feats)

    def predict_proba(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        p = np.zeros((len(images), len(self.class_names)))
        w = self.cnn_weight if self.keras_model is not None else 0.0
        w = w if self.linear is not None else 1.0
        if w > 0:
            p += w * sharpen(self.cnn_proba(images, tta), self.temperature_cnn)
        if w < 1:
            p += (1 - w) * sharpen(self.classical_proba(images, tta), self.temperature_classical)
        return p


def _cnn_input(images: np.ndarray, size: int) -> np.ndarray:
    """The whole face resized like the training crops (same bilinear crop_and_resize, full box)."""
    import tensorflow as tf

    n = len(images)
    boxes = tf.tile(tf.constant([[0.0, 0.0, 1.0, 1.0]]), [n, 1])
    return tf.image.crop_and_resize(tf.cast(images, tf.float32), boxes, tf.range(n), [size, size]).numpy()


def _features(images: np.ndarray, cfg: FeatureConfig, mirror: bool = True, chunk: int = 512) -> list[np.ndarray]:
    """[features] or [features, features of the mirror images], in chunks (bounded temporary memory)."""
    views = [extract(images[i : i + chunk], cfg) for i in range(0, len(images), chunk)]
    out = [np.concatenate(views)]
    if mirror:
        out.append(np.concatenate([extract(images[i : i + chunk, :, ::-1], cfg) for i in range(0, len(images), chunk)]))
    return out


def _linear_proba(linear: LinearModel, feats: list[np.ndarray]) -> np.ndarray:
    return np.mean([softmax(linear.logits(f)) for f in feats], axis=0)


def _fit_linear(feats: list[np.ndarray], labels: np.ndarray, k: int, config: TrainConfig) -> LinearModel:
    from train.model.data import class_weights

    x, y = feats[0], labels
    if config.flip_train and len(feats) > 1:
        x, y = np.concatenate(feats), np.concatenate([labels] * len(feats))
    weights = class_weights(y, k, config.class_weight_cap)
    return fit_linear(x, y, k, config.C, sample_weight=None if np.all(weights == 1) else weights[y])


def predict(classifier: Classifier, images: np.ndarray | Sequence[str | Path], tta: bool | None = None) -> np.ndarray:
    """Class probabilities (N, classes) for uint8 faces (N, H, W, 3) or image paths."""
    if not isinstance(images, np.ndarray):
        images = load_images(list(images), 96)
    if images.ndim == 3:
        images = images[None]
    if len(images) == 0:
        return np.zeros((0, len(classifier.class_names)))
    return classifier.predict_proba(np.asarray(images, dtype=np.uint8), tta=tta)


def predict_labels(classifier: Classifier, probabilities: np.ndarray) -> np.ndarray:
    """Class index per face, or -1 (unknown) when the best probability is under the model's threshold."""
    return np.where(probabilities.max(1) >= classifier.threshold, probabilities.argmax(1), -1)


def name_of(classifier: Classifier, row: np.ndarray) -> str:
    """The class name of one probability row, or 'unknown' under the threshold."""
    best = int(np.argmax(row))
    return classifier.class_names[best] if row[best] >= classifier.threshold else UNKNOWN


def top_k(classifier: Classifier, probabilities: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
    """The k most likely class names with their probabilities, per face (highest first)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [
        [(classifier.class_names[j], float(row[j])) for j in idx] for row, idx in zip(probabilities, order, strict=True)
    ]
