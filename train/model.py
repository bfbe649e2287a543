"""Train, evaluate, save and load the face classifier: plain functions the retrain/predict tasks call.

TensorFlow is imported only inside functions, never at module import, so Celery's parent process and
the CLI stay light and fork-safe.

The design (measured in bench/recognition/FINDINGS.md: 94-95% on the 20-character holoen-faces set
against 79.5% for a HOG + colour-histogram baseline) is an ensemble of

- a small ResNet trained from scratch (stride-2 stem, one basic residual block per stage, 32/64/128/256
  channels), with batch augmentation in TensorFlow ops (random crop + scale + mirror, brightness,
  contrast and saturation jitter, never hue: hair and eye colour name the character), AdamW with a
  warm-up and cosine decay, label smoothing. Its input size and epochs follow the number of training
  faces so that a retrain stays within its time budget (:func:`plan_cnn`): 64 px and 15 epochs for small
  sets, 48 px and fewer epochs for thousands of faces;
- or, when ImageNet weights can be had (``weights="imagenet"`` or a local no-top file), a pretrained
  MobileNetV2 at 96 px, head first then its top layers fine-tuned. Both CNNs are then trained in the same
  retrain and the better one on the validation slice is kept (both scores are recorded);
- the classical HOG + 4x4-grid colour-histogram logistic regression of :mod:`train.features`, which
  makes different mistakes.

Each part is temperature-scaled on a stratified validation slice held out inside :func:`train`; the
CNN's share of the average is the one with the best validation accuracy (ties: lower log-loss); a face
whose best probability is under the "unknown" threshold (5th percentile of the best probability over
correctly named validation faces) is ``unknown``. Prediction averages each face with its mirror image.

Typical use (the retrain task)::

    train_set = load_dataset(pairs_of_path_and_tag)
    test_set = load_dataset(test_pairs, train_set.class_names)
    result = train(train_set, TrainConfig.recommended(settings.backbone_weights, cache_dir=...))
    metrics = evaluate(result.classifier, test_set)
    save_artifacts(result.classifier, version_dir, metrics)
    probabilities = predict(load_artifacts(version_dir), faces)
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from train.features import FeatureConfig, LinearModel, extract, fit_linear, load_images, softmax

BACKBONES = ("resnet", "mobilenetv2", "none")  # "none": the classical model alone
FORMAT = 2
KERAS_FILE = "model.keras"
LINEAR_FILE = "classical.npz"
LABELS_FILE = "labels.json"
MANIFEST_FILE = "model.json"
WEIGHTS_SETTING = "WAIFU_BACKBONE_WEIGHTS"
UNKNOWN = "unknown"
# Keras' defaults (0.99, MobileNetV2 0.999) need thousands of steps before the moving statistics fit the
# data; a few thousand faces give a few hundred steps
BN_MOMENTUM = 0.9
# training throughput of the from-scratch ResNet on the 2-core service machine, faces x epochs per second
# (bench/recognition/FINDINGS.md): what plan_cnn() sizes the CNN with
FACES_PER_S = {64: 90.0, 48: 180.0}
MAX_EPOCHS = 15  # the full design; more was not measured
MIN_EPOCHS = 3
MOBILENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation: an offline machine fails in well under a second


class BackboneWeightsError(RuntimeError):
    """ImageNet weights could not be had (offline, bad file): names the setting to change."""


@dataclass
class TrainConfig:
    """Hyperparameters; recorded with every model version (after :meth:`resolved` filled in the CNN plan)."""

    backbone: str = "resnet"  # one of BACKBONES
    weights: str = "none"  # "imagenet" | "none" | path to a local no-top MobileNetV2 weights file
    input_size: int | None = None  # CNN input side; None = from the number of faces (plan_cnn)
    epochs: int | None = None  # CNN epochs; None = from the number of faces (plan_cnn)
    cnn_budget_s: float = 100.0  # CNN training seconds plan_cnn aims at (2 cores); 0 = the full design
    batch_size: int = 64
    learning_rate: float = 2e-3  # peak, after a linear warm-up; then cosine decay to zero
    warmup_epochs: int = 1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    dropout: float = 0.2
    stem: int = 24
    widths: tuple[int, ...] = (32, 64, 128, 256)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    crop_area: float = 0.6  # random crops keep 60-100% of the face's area
    jitter: float = 0.2  # brightness/contrast +-20%
    saturation: float = 0.2  # saturation +-20%; hue is never changed
    # pretrained MobileNetV2 (only when weights can be had)
    width: float = 0.35  # alpha; the ImageNet files exist for 0.35, 0.5, 0.75, 1.0, 1.3, 1.4
    pretrained_size: int = 96
    head_epochs: int = 3
    fine_tune_epochs: int = 5
    fine_tune_layers: int = 30  # backbone layers (from the top) unfrozen when fine-tuning
    fine_tune_learning_rate: float = 2e-4
    compare_scratch: bool = True  # with weights available, also train the from-scratch CNN and keep the better
    # classical part and ensemble
    features: FeatureConfig = field(default_factory=FeatureConfig)
    C: float = 0.03
    flip_train: bool = True
    validation_fraction: float = 0.1
    cnn_weight: float | None = None  # fixed CNN share of the average; None = chosen on validation
    unknown_percentile: float = 5.0
    seed: int = 0
    threads: int | None = 2  # TensorFlow intra-op threads (inter-op 1): the service has 2 cores
    tta: bool = True
    cache_dir: str | None = None  # where ImageNet weights are downloaded to / looked for
    plan: str = ""  # how input_size/epochs were chosen (filled by resolved())

    @classmethod
    def recommended(cls, weights: str = "none", **overrides: Any) -> TrainConfig:
        """The chosen design for a weights setting (the CNN plan is made from the data in train())."""
        return cls(**{"weights": weights or "none", **overrides})

    def resolved(self, n_cnn: int) -> TrainConfig:
        """A copy with the CNN's input size and epochs filled in for `n_cnn` training faces."""
        size, epochs, plan = plan_cnn(n_cnn, self.cnn_budget_s, self.input_size, self.epochs)
        return replace(self, input_size=size, epochs=epochs, plan=plan)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        raw = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        for key in ("widths", "blocks"):
            if key in raw:
                raw[key] = tuple(raw[key])
        features = FeatureConfig(**raw.pop("features", {}))
        return cls(features=features, **raw)


def plan_cnn(n: int, budget_s: float, size: int | None = None, epochs: int | None = None) -> tuple[int, int, str]:
    """(input side, epochs, why) for the from-scratch CNN on `n` faces within `budget_s` seconds.

    64 px for 15 epochs when that fits (FACES_PER_S); otherwise 48 px (about twice as fast, 1-2 points
    less) with as many epochs as fit, 3 at least (past that, time grows with the data rather than the
    model shrinking further). A given size or epochs is kept; 0 budget = the full design."""
    n = max(1, n)

    def cost(s: int, e: int) -> float:
        return n * e / FACES_PER_S.get(s, FACES_PER_S[64] * (64 / s) ** 2)

    if budget_s <= 0:
        s, e = size or 64, epochs or MAX_EPOCHS
        return s, e, f"full design: {s} px, {e} epochs (no time budget), estimated {cost(s, e):.0f}s"
    if size is None:
        size = 64 if cost(64, epochs or MAX_EPOCHS) <= budget_s else 48
    if epochs is None:
        fit = int(budget_s * FACES_PER_S.get(size, FACES_PER_S[64] * (64 / size) ** 2) / n)
        epochs = max(MIN_EPOCHS, min(MAX_EPOCHS, fit))
    why = (
        f"{n} CNN faces, budget {budget_s:.0f}s at {FACES_PER_S.get(size, 0):.0f} faces/s ({size} px): "
        f"{size} px, {epochs} epochs, estimated {cost(size, epochs):.0f}s"
    )
    return size, epochs, why


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


# -------------------------------------------------------------------------------- keras ----
def _keras(threads: int | None = None) -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass  # the runtime is already up (earlier training in this process): keep its threads
    return keras


def build_resnet(num_classes: int, config: TrainConfig, size: int) -> Any:
    """ResNet-style: stride-2 stem, basic residual blocks, global average pooling; outputs logits.

    ~60M multiply-adds per face at 64 px: what 2 CPU cores can train on thousands of faces in minutes."""
    keras = _keras(config.threads)
    L = keras.layers

    def conv(x: Any, f: int, k: int = 3, s: int = 1) -> Any:
        return L.Conv2D(f, k, strides=s, padding="same", use_bias=False, kernel_initializer="he_normal")(x)

    def bn(x: Any) -> Any:
        return L.BatchNormalization(momentum=BN_MOMENTUM)(x)

    inputs = keras.Input((size, size, 3), name="face")  # float RGB 0..255
    x = L.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = L.ReLU()(bn(conv(x, config.stem, 3, 2)))
    for i, (width, n_blocks) in enumerate(zip(config.widths, config.blocks, strict=True)):
        for j in range(n_blocks):
            stride = 2 if (i > 0 and j == 0) else 1
            y = L.ReLU()(bn(conv(x, width, 3, stride)))
            y = bn(conv(y, width))
            shortcut = x if (stride == 1 and x.shape[-1] == width) else bn(conv(x, width, 1, stride))
            x = L.ReLU()(L.Add()([y, shortcut]))
    x = L.GlobalAveragePooling2D(name="embedding")(x)
    x = L.Dropout(config.dropout)(x)
    outputs = L.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="face_resnet")


def _weights_arg(weights: str | None) -> str | None:
    if weights in ("none", "", None):
        return None
    if weights == "imagenet":
        return "imagenet"
    if not Path(weights).is_file():
        raise BackboneWeightsError(f"{WEIGHTS_SETTING}={weights!r}: no such weights file (or use 'imagenet' or 'none')")
    return str(weights)


def mobilenet_file_name(width: float, size: int) -> str:
    """Keras' name of the no-top ImageNet MobileNetV2 file (its sizes: 96, 128, 160, 192, 224)."""
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(width)}_{size}_no_top.h5"


def obtain_weights(config: TrainConfig) -> tuple[str | None, str]:
    """(local weights file or None, what happened). Never raises and never waits long: 'imagenet' is
    looked for under cache_dir, then downloaded there with a short socket timeout and no retries."""
    w = config.weights
    if w in ("none", "", None):
        return None, f"{WEIGHTS_SETTING}=none"
    if w != "imagenet":
        if Path(w).is_file():
            return str(w), f"local weights file {w}"
        return None, f"{WEIGHTS_SETTING}={w!r}: no such weights file; trained with weights=none"
    name = mobilenet_file_name(config.width, config.pretrained_size)
    cache = Path(config.cache_dir or Path.home() / ".keras")
    cached = cache / "models" / name
    if cached.is_file() and cached.stat().st_size > 0:
        return str(cached), f"ImageNet weights from the cache {cached}"
    keras = _keras(config.threads)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        path = keras.utils.get_file(name, MOBILENET_URL + name, cache_subdir="models", cache_dir=str(cache))
        return str(path), f"ImageNet weights downloaded to {path}"
    except Exception as exc:  # offline, proxy, disk: the retrain goes on from scratch
        cached.unlink(missing_ok=True)
        why = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        return None, f"ImageNet weights unavailable ({why}); trained with weights=none"
    finally:
        socket.setdefaulttimeout(previous)


def build_model(
    num_classes: int,
    backbone: str = "mobilenetv2",
    input_size: int = 96,
    weights: str = "imagenet",
    *,
    width: float = 0.35,
    dropout: float = 0.2,
    config: TrainConfig | None = None,
) -> Any:
    """A Keras model taking (input_size, input_size, 3) floats in 0..255 and returning class logits.

    ``resnet``: the from-scratch design. ``mobilenetv2``: the headless application model with `weights`
    (a file or 'imagenet'), frozen (the first training phase fits the head only); a missing file raises
    BackboneWeightsError naming the setting."""
    config = config or TrainConfig(dropout=dropout, width=width)
    if backbone == "resnet":
        return build_resnet(num_classes, config, input_size)
    if backbone != "mobilenetv2":
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {BACKBONES}")
    keras = _keras(config.threads)
    L = keras.layers
    w = _weights_arg(weights)
    try:
        base = keras.applications.MobileNetV2(
            input_shape=(input_size, input_size, 3), alpha=width, include_top=False, weights=w
        )
    except Exception as exc:
        if w is None:
            raise
        raise BackboneWeightsError(
            f"could not load {weights!r} weights for {backbone} ({exc}). Offline? Set {WEIGHTS_SETTING} to a "
            f"local no-top weights file for {backbone} at input size {input_size}, or to 'none'."
        ) from exc
    base.trainable = w is None
    inputs = keras.Input((input_size, input_size, 3), name="face")
    x = L.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)  # = mobilenet_v2.preprocess_input, serialisable
    x = base(x, training=None if base.trainable else False)  # frozen: BatchNorm statistics stay fixed
    x = L.GlobalAveragePooling2D(name="embedding")(x)
    x = L.Dropout(dropout)(x)
    outputs = L.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="face_mobilenetv2")


def _augment_fn(config: TrainConfig, size: int, num_classes: int) -> Callable[[Any, Any], tuple[Any, Any]]:
    """Batch augmentation in TensorFlow ops: random crop + scale + mirror in one crop_and_resize, then
    brightness/contrast/saturation jitter; hue is never changed."""
    import tensorflow as tf

    def augment(images: Any, labels: Any) -> tuple[Any, Any]:
        n = tf.shape(images)[0]
        area = tf.random.uniform([n], config.crop_area, 1.0)
        aspect = tf.exp(tf.random.uniform([n], -0.15, 0.15))
        h = tf.minimum(tf.sqrt(area * aspect), 1.0)
        w = tf.minimum(tf.sqrt(area / aspect), 1.0)
        y0 = tf.random.uniform([n]) * (1 - h)
        x0 = tf.random.uniform([n]) * (1 - w)
        flip = tf.random.uniform([n]) < 0.5
        x1, x2 = tf.where(flip, x0 + w, x0), tf.where(flip, x0, x0 + w)  # a reversed box mirrors the crop
        boxes = tf.stack([y0, x1, y0 + h, x2], 1)
        img = tf.image.crop_and_resize(tf.cast(images, tf.float32), boxes, tf.range(n), [size, size])
        if config.jitter > 0:
            j = config.jitter
            mean = tf.reduce_mean(img, [1, 2, 3], keepdims=True)
            contrast = tf.random.uniform([n, 1, 1, 1], 1 - j, 1 + j)
            bright = tf.random.uniform([n, 1, 1, 1], -j, j) * 127.5
            img = (img - mean) * contrast + mean + bright
        if config.saturation > 0:
            grey = tf.reduce_mean(img, -1, keepdims=True)
            sat = tf.random.uniform([n, 1, 1, 1], 1 - config.saturation, 1 + config.saturation)
            img = grey + (img - grey) * sat
        return tf.clip_by_value(img, 0.0, 255.0), tf.one_hot(labels, num_classes)

    return augment


def _fit_keras(
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config: TrainConfig,
    size: int,
    epochs: int,
    learning_rate: float,
    warmup_epochs: int,
    phase: str,
    progress: Callable[[dict[str, Any]], None] | None,
) -> dict[str, list]:
    """One training phase: augmented batches, AdamW, warm-up then cosine decay, label smoothing."""
    keras = _keras(config.threads)
    import tensorflow as tf

    # small sets: smaller batches, so an epoch still has a few steps (at least 16 faces a batch)
    bs = max(1, min(config.batch_size, max(16, len(images) // 8), len(images)))
    ds = (
        tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
        .shuffle(len(images), seed=config.seed, reshuffle_each_iteration=True)
        .batch(bs, drop_remainder=True)  # a last tiny batch would give noisy BatchNorm statistics
        .map(_augment_fn(config, size, num_classes), num_parallel_calls=1)
        .prefetch(2)
    )
    steps = max(1, len(images) // bs)
    warm = min(steps * warmup_epochs, steps * epochs - 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        learning_rate * 0.1, max(1, steps * epochs - warm), alpha=0.0, warmup_target=learning_rate, warmup_steps=warm
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )
    callbacks = []
    if progress is not None:
        callbacks.append(
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda e, logs: progress(
                    {"phase": phase, "epoch": e + 1, "epochs": epochs, **{k: float(v) for k, v in logs.items()}}
                )
            )
        )
    hist = model.fit(ds, epochs=epochs, verbose=0, callbacks=callbacks, shuffle=False)  # tf.data shuffles
    out: dict[str, list] = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    out["phase"] = [phase] * epochs
    return out


def _unfreeze_top(model: Any, n_layers: int) -> None:
    """Unfreeze the backbone's top layers, keeping BatchNorm frozen (its statistics from few faces are noise)."""
    import keras

    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    base.trainable = True
    for i, layer in enumerate(base.layers):
        top = i >= len(base.layers) - n_layers
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)


def _clean_copy(model: Any, num_classes: int, backbone: str, size: int, config: TrainConfig) -> Any:
    """An uncompiled copy with the same weights: the saved file then holds no optimizer state."""
    clean = build_model(num_classes, backbone, size, "none", width=config.width, dropout=config.dropout, config=config)
    clean.set_weights(model.get_weights())
    return clean


def fit_cnn(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config: TrainConfig,
    backbone: str = "resnet",
    weights_file: str | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Any, int, dict[str, list]]:
    """(uncompiled Keras model, input side, history). ``resnet`` from scratch at config.input_size for
    config.epochs; ``mobilenetv2`` from `weights_file` at pretrained_size, head then fine-tuning."""
    keras = _keras(config.threads)
    keras.utils.set_random_seed(config.seed)
    if backbone == "resnet":
        size = int(config.input_size or 64)
        model = build_resnet(num_classes, config, size)
        hist = _fit_keras(model, images, labels, num_classes, config, size, int(config.epochs or MAX_EPOCHS),
                          config.learning_rate, config.warmup_epochs, "scratch", progress)  # fmt: skip
        return _clean_copy(model, num_classes, backbone, size, config), size, hist
    size = config.pretrained_size
    model = build_model(num_classes, "mobilenetv2", size, weights_file or "none", width=config.width,
                        dropout=config.dropout, config=config)  # fmt: skip
    hist = _fit_keras(model, images, labels, num_classes, config, size, config.head_epochs, 1e-3, 0, "head", progress)
    if config.fine_tune_epochs > 0:
        _unfreeze_top(model, config.fine_tune_layers)
        more = _fit_keras(model, images, labels, num_classes, config, size, config.fine_tune_epochs,
                          config.fine_tune_learning_rate, 0, "fine_tune", progress)  # fmt: skip
        hist = {k: hist.get(k, []) + more.get(k, []) for k in set(hist) | set(more)}
    return _clean_copy(model, num_classes, backbone, size, config), size, hist


# ------------------------------------------------------------------------------ ensemble ----
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


# -------------------------------------------------------------------------- classifier ----
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
    return sum(softmax(linear.logits(f)) for f in feats) / len(feats)


def _fit_linear(feats: list[np.ndarray], labels: np.ndarray, k: int, config: TrainConfig) -> LinearModel:
    x, y = feats[0], labels
    if config.flip_train and len(feats) > 1:
        x, y = np.concatenate(feats), np.concatenate([labels] * len(feats))
    return fit_linear(x, y, k, config.C)


# ---------------------------------------------------------------------------- training ----
@dataclass
class TrainResult:
    classifier: Classifier
    history: dict[str, list]  # per CNN epoch: loss, accuracy (under augmentation), phase
    duration_s: float
    epochs_run: int
    train_counts: dict[str, int]
    validation_accuracy: float | None
    weights_note: str = ""  # what happened to the backbone weights setting (download, fallback, file)
    pretrained_used: bool = False

    @property
    def model(self) -> Classifier:
        return self.classifier


def _ensemble(
    clf: Classifier, p_cnn: np.ndarray | None, p_cls: np.ndarray | None, y: np.ndarray, config: TrainConfig
) -> dict[str, Any]:
    """Temperatures, CNN weight and threshold from validation probabilities; sets them on `clf`."""
    info: dict[str, Any] = {}
    if p_cnn is not None:
        clf.temperature_cnn = fit_temperature(p_cnn, y)
        p_cnn = sharpen(p_cnn, clf.temperature_cnn)
        info["validation_accuracy_cnn"] = float((p_cnn.argmax(1) == y).mean())
    if p_cls is not None:
        clf.temperature_classical = fit_temperature(p_cls, y)
        p_cls = sharpen(p_cls, clf.temperature_classical)
        info["validation_accuracy_classical"] = float((p_cls.argmax(1) == y).mean())
    if p_cnn is not None and p_cls is not None:
        clf.cnn_weight = config.cnn_weight if config.cnn_weight is not None else choose_weight(p_cnn, p_cls, y)
    else:
        clf.cnn_weight = 1.0 if p_cnn is not None else 0.0
    p = sum(w * q for w, q in ((clf.cnn_weight, p_cnn), (1 - clf.cnn_weight, p_cls)) if q is not None and w > 0)
    clf.threshold = unknown_threshold(p, y, config.unknown_percentile)
    n_right = int((p.argmax(1) == y).sum())
    info.update(
        validation_accuracy=float((p.argmax(1) == y).mean()),
        validation_log_loss=_nll(p, y),
        validation_faces=int(len(y)),
        cnn_weight=clf.cnn_weight,
        temperatures={"cnn": clf.temperature_cnn, "classical": clf.temperature_classical},
        threshold=clf.threshold,
        threshold_rule=(
            f"{config.unknown_percentile:g}th percentile of the best probability over the {n_right} validation "
            f"faces named correctly (of {len(y)}, held out of training)"
        ),
        threshold_by_percentile={f"{q:g}": unknown_threshold(p, y, q) for q in (1.0, 2.0, 5.0, 10.0, 20.0)},
        validation_unknown_share=float((p.max(1) < clf.threshold).mean()),
    )
    return info


def train(
    train_set: Dataset,
    config: TrainConfig | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fit the ensemble on a training set (see the module docstring); never downloads for long and never
    fails for want of ImageNet weights (the note says what happened)."""
    config = config or TrainConfig()
    start = time.perf_counter()
    names, k = list(train_set.class_names), len(train_set.class_names)
    images = np.asarray(train_set.images, dtype=np.uint8)
    labels = np.asarray(train_set.labels, dtype=np.int64)
    tr, va = stratified_split(labels, config.validation_fraction, config.seed)
    if len(va) == 0:
        tr = np.arange(len(images))
    config = config.resolved(len(tr))
    use_cnn = config.backbone != "none"
    info: dict[str, Any] = {"n_train": int(len(images)), "n_cnn": int(len(tr)), "plan": config.plan}

    t = time.perf_counter()  # classical part: features once, a fit without the validation slice, a final fit
    feats = _features(images, config.features, mirror=True)
    p_cls_val = None
    if len(va):
        lin_tr = _fit_linear([f[tr] for f in feats], labels[tr], k, config)
        p_cls_val = _linear_proba(lin_tr, [f[va] for f in feats])
    linear = _fit_linear(feats, labels, k, config)  # cheap: refit on every face
    del feats
    info["classical_s"] = time.perf_counter() - t
    if progress:
        progress({"phase": "classical", "epoch": 0, "epochs": config.epochs, "seconds": info["classical_s"]})

    weights_file, note = obtain_weights(config) if use_cnn else (None, "no CNN (backbone=none)")
    info["weights"] = {"setting": config.weights, "note": note, "file": weights_file}
    variants = []
    if use_cnn and weights_file:
        variants.append("mobilenetv2")
    if use_cnn and (not weights_file or config.compare_scratch):
        variants.append("resnet")

    candidates = []
    for backbone in variants:
        t = time.perf_counter()
        model, size, hist = fit_cnn(images[tr], labels[tr], k, config, backbone, weights_file, progress)
        clf = Classifier(names, config, model, linear, cnn_backbone=backbone, cnn_size=size)
        p_cnn_val = clf.cnn_proba(images[va]) if len(va) else None
        part = _ensemble(clf, p_cnn_val, p_cls_val, labels[va], config) if len(va) else {}
        part["cnn_s"] = time.perf_counter() - t
        candidates.append((clf, hist, part))
    if not candidates:  # classical alone
        clf = Classifier(names, config, None, linear, cnn_weight=0.0, cnn_backbone="none", cnn_size=0)
        part = _ensemble(clf, None, p_cls_val, labels[va], config) if len(va) else {}
        candidates.append((clf, {}, part))
    # the better on validation: accuracy, then lower log-loss
    best = max(candidates, key=lambda c: (c[2].get("validation_accuracy", 0.0), -c[2].get("validation_log_loss", 0.0)))
    clf, history, part = best
    info.update(part)
    if len(candidates) > 1:
        info["compared"] = {c[0].cnn_backbone: {key: c[2].get(key) for key in (
            "validation_accuracy", "validation_accuracy_cnn", "validation_log_loss", "cnn_weight", "cnn_s")}
            for c in candidates}  # fmt: skip
        info["kept"] = clf.cnn_backbone
    info["fit_s"] = time.perf_counter() - start
    clf.info = info
    return TrainResult(
        clf,
        history,
        info["fit_s"],
        len(history.get("loss", [])),
        train_set.counts(),
        info.get("validation_accuracy"),
        note,
        clf.cnn_backbone == "mobilenetv2",
    )


# -------------------------------------------------------------------------- evaluation ----
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


# --------------------------------------------------------------------------- artifacts ----
def save_artifacts(classifier: Classifier, directory: str | Path, metrics: Metrics | None = None) -> Path:
    """One directory: model.keras (if a CNN), classical.npz, labels.json, model.json (weights, temperatures,
    threshold, config, validation info), metrics.json."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if classifier.keras_model is not None:
        classifier.keras_model.save(d / KERAS_FILE)
    if classifier.linear is not None:
        np.savez(d / LINEAR_FILE, **classifier.linear.arrays(""))
    (d / LABELS_FILE).write_text(json.dumps(classifier.class_names, indent=2))
    manifest = {
        "format": FORMAT,
        "class_names": classifier.class_names,
        "config": classifier.config.to_dict(),
        "cnn_weight": classifier.cnn_weight,
        "threshold": classifier.threshold,
        "temperature_cnn": classifier.temperature_cnn,
        "temperature_classical": classifier.temperature_classical,
        "cnn_backbone": classifier.cnn_backbone,
        "cnn_size": classifier.cnn_size,
        "has_cnn": classifier.keras_model is not None,
        "has_classical": classifier.linear is not None,
        "info": classifier.info,
    }
    (d / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=_json_default))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics.to_dict(), indent=2, default=_json_default))
    return d


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_artifacts(directory: str | Path) -> Classifier:
    d = Path(directory)
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{d}: model format {manifest.get('format')!r}, this code reads {FORMAT}; retrain")
    config = TrainConfig.from_dict(manifest["config"])
    keras_model = None
    if manifest["has_cnn"]:
        keras = _keras(config.threads)
        keras_model = keras.models.load_model(d / KERAS_FILE, compile=False, safe_mode=True)
    linear = None
    if manifest["has_classical"]:
        with np.load(d / LINEAR_FILE, allow_pickle=False) as arrays:
            linear = LinearModel.from_arrays(dict(arrays), "")
    return Classifier(
        manifest["class_names"],
        config,
        keras_model,
        linear,
        float(manifest["cnn_weight"]),
        float(manifest["threshold"]),
        float(manifest["temperature_cnn"]),
        float(manifest["temperature_classical"]),
        manifest["cnn_backbone"],
        int(manifest["cnn_size"]),
        manifest.get("info", {}),
    )
