"""Train, evaluate, save and load the face classifier: plain functions the retrain/predict tasks call.

TensorFlow is imported only inside functions, never at module import, so Celery's parent process and
the CLI stay light and fork-safe.

The model is an ensemble, chosen by the numbers in ``bench/train.py``:

- a Keras CNN with augmentation layers (flip, small rotation/zoom/shift, brightness/contrast, never hue)
  and a softmax head. Its body is an ImageNet-style backbone (MobileNetV2 or EfficientNet-B0) when
  ImageNet weights are available: frozen first, then its top blocks fine-tuned. From scratch
  (``weights="none"``) those backbones barely learn from a few dozen faces per class, so the offline
  default is a small 4-block CNN at 64x64;
- the classical HOG + colour-histogram logistic regression of :mod:`train.features`, which from
  scratch generalises as well as the CNN and makes different mistakes;

averaged (``classical_weight``, default 0.5) with mirror test-time augmentation. One artifact directory
holds both parts (see :func:`save_artifacts`).

Typical use (the retrain task)::

    train_set = load_dataset(pairs_of_path_and_tag)
    test_set = load_dataset(test_pairs, train_set.class_names)
    result = train(train_set, TrainConfig.recommended(settings.backbone_weights, seed=..., cache_dir=...))
    metrics = evaluate(result.classifier, test_set)
    save_artifacts(result.classifier, version_dir, metrics)
    probabilities = predict(load_artifacts(version_dir), faces)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from train.features import ClassicalConfig, ClassicalModel, FeatureConfig, fit_classical, load_images

BACKBONES = ("mobilenetv2", "efficientnetb0", "smallcnn", "none")
KERAS_FILE = "model.keras"
LABELS_FILE = "labels.json"
MANIFEST_FILE = "model.json"
WEIGHTS_SETTING = "WAIFU_BACKBONE_WEIGHTS"
# Keras' defaults (0.99, MobileNetV2 0.999) need thousands of steps before the moving statistics fit the
# data; a small training set gives a few steps per epoch, and evaluation would be at chance for long.
BN_MOMENTUM = 0.9


class BackboneWeightsError(RuntimeError):
    """ImageNet weights could not be had (offline, bad file): names the setting to change."""


@dataclass
class TrainConfig:
    """Hyperparameters; recorded with every model version.

    The defaults are the design chosen offline (``weights="none"``): a small CNN at 64x64 averaged with
    the classical model. With ImageNet weights start from :meth:`recommended` instead."""

    backbone: str = "smallcnn"  # one of BACKBONES; "none" trains the classical part alone
    input_size: int = 64  # from scratch, 64 generalised better than 96 (bench/train.py)
    weights: str = "none"  # "imagenet" | "none" | path to a local (no-top) weights file
    width: float = 0.35  # MobileNetV2 alpha; the ImageNet files exist for 0.35, 0.5, 0.75, 1.0, 1.3, 1.4
    epochs: int = 120
    fine_tune_epochs: int = 20  # 0 disables fine-tuning (pretrained weights only)
    fine_tune_layers: int = 30  # backbone layers (from the top) unfrozen when fine-tuning
    batch_size: int = 16
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-5
    weight_decay: float = 1e-4
    dropout: float = 0.3
    label_smoothing: float = 0.1
    augment: bool = True
    validation_fraction: float = 0.15  # stratified slice of train for early stopping
    patience: int = 30  # from scratch the validation loss is noisy for dozens of epochs
    class_weights: bool = True
    seed: int = 0
    tta: bool = True  # average each prediction with the mirrored face
    classical_weight: float = 0.5  # share of the classical model in the ensemble; 0 = CNN alone
    classical: ClassicalConfig = field(default_factory=ClassicalConfig)
    threads: int | None = None  # TensorFlow intra/inter-op threads; None = TensorFlow's default
    cache_dir: str | None = None  # where Keras caches downloaded ImageNet weights (KERAS_HOME)

    @classmethod
    def recommended(cls, weights: str = "none", **overrides: Any) -> TrainConfig:
        """The chosen design for a weights setting: from scratch the defaults; pretrained, MobileNetV2 at
        96x96, frozen then fine-tuned (not measurable offline: see bench/train.py --weights)."""
        if weights in ("none", ""):
            return cls(**overrides)
        pretrained = {"backbone": "mobilenetv2", "input_size": 96, "epochs": 60, "patience": 12}
        return cls(**{**pretrained, "weights": weights, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        raw = dict(raw)
        cl = dict(raw.pop("classical", {}))
        features = FeatureConfig(**cl.pop("features", {}))
        return cls(classical=ClassicalConfig(features=features, **cl), **raw)


# --------------------------------------------------------------------------------- data ----
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
    """Indices (train, validation): about `fraction` of each class, at least one, never the last one."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(max(1, round(fraction * len(idx))), len(idx) - 1) if fraction > 0 else 0
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """n / (k * count): each class weighs the same in the loss, whatever its number of faces."""
    counts = np.bincount(labels, minlength=num_classes)
    present = counts > 0
    w = len(labels) / (present.sum() * np.maximum(counts, 1))
    return {i: float(w[i]) for i in range(num_classes) if present[i]}


# -------------------------------------------------------------------------------- keras ----
def _keras(config: TrainConfig | None = None) -> Any:
    """Import Keras on first use, with the cache dir and thread limits the config asks for."""
    if config is not None and config.cache_dir and "keras" not in sys.modules:
        # Keras reads KERAS_HOME once, at import: only the first import can move the weights cache
        os.environ.setdefault("KERAS_HOME", str(config.cache_dir))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    if config is not None and config.threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(config.threads)
            tf.config.threading.set_inter_op_parallelism_threads(config.threads)
        except RuntimeError:
            pass  # the runtime is already up (earlier training in this process): keep its threads
    return keras


def _augmentation(keras: Any, seed: int) -> Any:
    """Geometry and light, never hue: hair and eye colour are what tells characters apart."""
    L = keras.layers
    return keras.Sequential(
        [
            L.RandomFlip("horizontal", seed=seed),
            L.RandomRotation(0.04, fill_mode="reflect", seed=seed + 1),
            L.RandomZoom((-0.12, 0.08), fill_mode="reflect", seed=seed + 2),
            L.RandomTranslation(0.06, 0.06, fill_mode="reflect", seed=seed + 3),
            L.RandomBrightness(0.12, value_range=(0.0, 255.0), seed=seed + 4),
            L.RandomContrast(0.15, seed=seed + 5),
        ],
        name="augmentation",
    )


def _small_cnn(keras: Any, inputs: Any) -> Any:
    L = keras.layers
    x = L.Rescaling(1.0 / 255.0)(inputs)
    for filters in (32, 64, 128, 192):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = L.BatchNormalization(momentum=BN_MOMENTUM)(x)
        x = L.Activation("relu")(x)
        x = L.MaxPooling2D()(x)
    return x


def _weights_arg(weights: str) -> str | None:
    if weights in ("none", "", None):
        return None
    if weights == "imagenet":
        return "imagenet"
    if not Path(weights).is_file():
        raise BackboneWeightsError(f"{WEIGHTS_SETTING}={weights!r}: no such weights file (or use 'imagenet' or 'none')")
    return str(weights)


def _backbone(keras: Any, name: str, size: int, weights: str, width: float) -> Any:
    """The headless application model, with a clear error naming the setting when weights are missing."""
    w = _weights_arg(weights)
    shape = (size, size, 3)
    try:
        if name == "mobilenetv2":
            return keras.applications.MobileNetV2(input_shape=shape, alpha=width, include_top=False, weights=w)
        if name == "efficientnetb0":
            return keras.applications.EfficientNetB0(input_shape=shape, include_top=False, weights=w)
    except BackboneWeightsError:
        raise
    except Exception as exc:
        if w is None:
            raise
        raise BackboneWeightsError(
            f"could not load {weights!r} weights for {name} ({exc}). Offline? Set {WEIGHTS_SETTING} to a "
            f"local no-top weights file for {name} at input size {size}, or to 'none' to train from scratch."
        ) from exc
    raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")


def _set_bn_momentum(model: Any, momentum: float) -> None:
    import keras

    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def build_model(
    num_classes: int,
    backbone: str = "mobilenetv2",
    input_size: int = 96,
    weights: str = "imagenet",
    *,
    width: float = 0.35,
    dropout: float = 0.3,
    augment: bool = True,
    seed: int = 0,
    config: TrainConfig | None = None,
) -> Any:
    """A Keras model taking (input_size, input_size, 3) floats in 0..255 and returning class probabilities.

    Pretrained backbones come back frozen (the first training phase only fits the head)."""
    keras = _keras(config)
    L = keras.layers
    inputs = keras.Input((input_size, input_size, 3), name="face")
    x = _augmentation(keras, seed)(inputs) if augment else inputs
    if backbone == "smallcnn":
        x = _small_cnn(keras, x)
    else:
        base = _backbone(keras, backbone, input_size, weights, width)
        base.trainable = _weights_arg(weights) is None
        if base.trainable:
            _set_bn_momentum(base, BN_MOMENTUM)
        if backbone == "mobilenetv2":
            x = L.Rescaling(1.0 / 127.5, offset=-1.0)(x)  # = mobilenet_v2.preprocess_input, serialisable
        # EfficientNet normalises its 0..255 input itself; training=False keeps frozen BN statistics fixed
        x = base(x, training=None if base.trainable else False)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dropout(dropout, seed=seed)(x)
    outputs = L.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"waifu_{backbone}")


# -------------------------------------------------------------------------- classifier ----
@dataclass
class Classifier:
    """What training produces and prediction uses: CNN and/or classical model, plus class names."""

    class_names: list[str]
    config: TrainConfig
    keras_model: Any | None = None
    classical: ClassicalModel | None = None
    _infer_fn: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def input_size(self) -> int:
        return self.config.input_size

    def cnn_proba(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        tta = self.config.tta if tta is None else tta
        x = _fit_size(images, self.input_size).astype(np.float32)
        views = np.concatenate([x, x[:, :, ::-1]]) if tta else x  # one call for both views
        if self._infer_fn is None:
            self._infer_fn = _inference_function(self.keras_model)
        p = _infer(self._infer_fn, views)
        return (p[: len(x)] + p[len(x) :]) / 2 if tta else p

    def predict_proba(self, images: np.ndarray, tta: bool | None = None) -> np.ndarray:
        tta = self.config.tta if tta is None else tta
        w = self.config.classical_weight if self.keras_model is not None else 1.0
        if self.classical is None:
            w = 0.0
        p = np.zeros((len(images), len(self.class_names)))
        if w < 1.0:
            p += (1.0 - w) * self.cnn_proba(images, tta)
        if w > 0.0:
            p += w * self.classical.predict_proba(images, tta=tta)
        return p


def _inference_function(model: Any) -> Any:
    """A traced call: model.predict() costs ~40 ms per call and eager calls up to 100 ms; this 2-9 ms."""
    import tensorflow as tf

    def call(x: Any) -> Any:
        return model(x, training=False)

    # no autograph: a plain call has no Python control flow to convert
    return tf.function(call, reduce_retracing=True, autograph=False)


def _infer(fn: Any, x: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i : i + batch])) for i in range(0, len(x), batch)])


def _fit_size(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:3] == (size, size):
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR)) for im in images])


# ---------------------------------------------------------------------------- training ----
@dataclass
class TrainResult:
    classifier: Classifier
    history: dict[str, list[float]]  # per epoch, phases concatenated; "phase" says which was which
    duration_s: float
    epochs_run: int
    train_counts: dict[str, int]
    validation_accuracy: float | None

    @property
    def model(self) -> Classifier:
        return self.classifier


def _seed_everything(keras: Any, seed: int) -> None:
    keras.utils.set_random_seed(seed)  # python, numpy and the backend at once


def _fit_phase(
    keras: Any,
    model: Any,
    data: tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None],
    epochs: int,
    lr: float,
    config: TrainConfig,
    class_weight: dict[int, float] | None,
    progress: Callable[[dict[str, Any]], None] | None,
    phase: str,
) -> dict[str, list[float]]:
    x, y, xv, yv = data
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=lr, weight_decay=config.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )
    has_val = xv is not None and len(xv) > 0
    monitor = "val_loss" if has_val else "loss"
    callbacks: list[Any] = [
        keras.callbacks.EarlyStopping(monitor=monitor, patience=config.patience, restore_best_weights=True)
    ]
    if progress is not None:
        callbacks.append(
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: progress(
                    {"phase": phase, "epoch": epoch + 1, "epochs": epochs, **{k: float(v) for k, v in logs.items()}}
                )
            )
        )
    hist = model.fit(
        x,
        y,
        batch_size=config.batch_size,
        epochs=epochs,
        validation_data=(xv, yv) if has_val else None,
        class_weight=class_weight,
        callbacks=callbacks,
        shuffle=True,
        verbose=0,
    )
    return {k: [float(v) for v in vals] for k, vals in hist.history.items()}


def _unfreeze_top(model: Any, n_layers: int) -> None:
    """Unfreeze the backbone's top layers, keeping BatchNorm frozen (its statistics from few faces are noise)."""
    import keras

    base = next(layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name != "augmentation")
    base.trainable = True
    for i, layer in enumerate(base.layers):
        top = i >= len(base.layers) - n_layers
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)


def train(
    train_set: Dataset,
    config: TrainConfig | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fit the classifier on a training set; early stopping watches a stratified slice of it."""
    config = config or TrainConfig()
    start = time.perf_counter()
    names, k = list(train_set.class_names), len(train_set.class_names)
    cw = balanced_class_weights(train_set.labels, k) if config.class_weights else None
    history: dict[str, list[float]] = {}
    keras_model, epochs_run, val_acc = None, 0, None

    if config.backbone != "none":
        keras = _keras(config)
        _seed_everything(keras, config.seed)
        tr, va = stratified_split(train_set.labels, config.validation_fraction, config.seed)
        x = _fit_size(train_set.images, config.input_size).astype(np.float32)
        onehot = np.eye(k, dtype=np.float32)[train_set.labels]
        data = (x[tr], onehot[tr], x[va] if len(va) else None, onehot[va] if len(va) else None)
        keras_model = build_model(
            k, config.backbone, config.input_size, config.weights, width=config.width, dropout=config.dropout,
            augment=config.augment, seed=config.seed, config=config,
        )  # fmt: skip
        pretrained = config.backbone != "smallcnn" and _weights_arg(config.weights) is not None
        phases = [("head" if pretrained else "scratch", config.epochs, config.learning_rate)]
        if pretrained and config.fine_tune_epochs > 0:
            phases.append(("fine_tune", config.fine_tune_epochs, config.fine_tune_learning_rate))
        for phase, epochs, lr in phases:
            if phase == "fine_tune":
                _unfreeze_top(keras_model, config.fine_tune_layers)
            h = _fit_phase(keras, keras_model, data, epochs, lr, config, cw, progress, phase)
            n = len(next(iter(h.values())))
            epochs_run += n
            for key, vals in h.items():
                history.setdefault(key, []).extend(vals)
            history.setdefault("phase", []).extend([phase] * n)  # type: ignore[arg-type]
        if len(va):
            val_acc = float((keras_model.predict(data[2], verbose=0).argmax(1) == train_set.labels[va]).mean())

    classical = None
    if config.classical_weight > 0 or config.backbone == "none":
        # the classical part is cheap and has no early stopping: it uses every training face
        classical = fit_classical(train_set.images, train_set.labels, k, config.classical, class_weight=cw)

    clf = Classifier(names, config, keras_model, classical)
    return TrainResult(clf, history, time.perf_counter() - start, epochs_run, train_set.counts(), val_acc)


# -------------------------------------------------------------------------- evaluation ----
@dataclass
class Metrics:
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]  # name -> precision, recall, f1, support
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    class_names: list[str]
    n: int

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
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(true_n[i]),
        }
        for i, name in enumerate(class_names)
    }
    n = int(cm.sum())
    return Metrics(
        accuracy=float(tp.sum() / n) if n else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        per_class=per_class,
        confusion=cm.tolist(),
        class_names=list(class_names),
        n=n,
    )


def evaluate(classifier: Classifier, test_set: Dataset, tta: bool | None = None) -> Metrics:
    """Accuracy, macro-F1, per-class precision/recall and the confusion matrix on a labelled split."""
    if list(test_set.class_names) != list(classifier.class_names):
        raise ValueError("test set class names differ from the model's: load it with the model's class_names")
    pred = predict(classifier, test_set.images, tta=tta).argmax(1)
    return metrics_from_predictions(test_set.labels, pred, classifier.class_names)


def predict(classifier: Classifier, images: np.ndarray | Sequence[str | Path], tta: bool | None = None) -> np.ndarray:
    """Class probabilities (N, classes) for uint8 faces (N, H, W, 3) or image paths."""
    if not isinstance(images, np.ndarray):
        images = load_images(list(images), 96)
    if images.ndim == 3:
        images = images[None]
    if len(images) == 0:
        return np.zeros((0, len(classifier.class_names)))
    return classifier.predict_proba(np.asarray(images, dtype=np.uint8), tta=tta)


def top_k(classifier: Classifier, probabilities: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
    """The k most likely class names with their probabilities, per face."""
    order = np.argsort(-probabilities, axis=1)[:, :k]
    return [
        [(classifier.class_names[j], float(row[j])) for j in idx] for row, idx in zip(probabilities, order, strict=True)
    ]


# --------------------------------------------------------------------------- artifacts ----
def save_artifacts(classifier: Classifier, directory: str | Path, metrics: Metrics | None = None) -> Path:
    """One directory: model.keras (if any), classical.npz/json (if any), labels.json, model.json."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if classifier.keras_model is not None:
        classifier.keras_model.save(d / KERAS_FILE)
    if classifier.classical is not None:
        classifier.classical.save(d)
    (d / LABELS_FILE).write_text(json.dumps(classifier.class_names, indent=2))
    manifest = {
        "format": 1,
        "class_names": classifier.class_names,
        "config": classifier.config.to_dict(),
        "has_cnn": classifier.keras_model is not None,
        "has_classical": classifier.classical is not None,
    }
    (d / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics.to_dict(), indent=2))
    return d


def load_artifacts(directory: str | Path) -> Classifier:
    d = Path(directory)
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    config = TrainConfig.from_dict(manifest["config"])
    keras_model = None
    if manifest["has_cnn"]:
        keras = _keras()
        keras_model = keras.models.load_model(d / KERAS_FILE, compile=False)
    classical = ClassicalModel.load(d) if manifest["has_classical"] else None
    return Classifier(json.loads((d / LABELS_FILE).read_text()), config, keras_model, classical)
