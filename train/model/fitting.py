"""Fitting: CNN training phases with batch augmentation, then the whole ensemble (:func:`train`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from train.model.backbones import _keras, build_model, build_resnet, obtain_weights
from train.model.calibration import _nll, choose_weight, fit_temperature, sharpen, unknown_threshold
from train.model.classifier import Classifier, _features, _fit_linear, _linear_proba
from train.model.config import MAX_EPOCHS, TrainConfig
from train.model.data import Dataset, class_weights, stratified_split


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
    augment = _augment_fn(config, size, num_classes)
    # class-balanced loss: each face weighs its class's weight (class_weights, capped)
    weights = class_weights(labels, num_classes, config.class_weight_cap)[labels].astype(np.float32)
    ds = (
        tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32), weights))
        .shuffle(len(images), seed=config.seed, reshuffle_each_iteration=True)
        .batch(bs, drop_remainder=True)  # a last tiny batch would give noisy BatchNorm statistics
        .map(lambda x, y, w: (*augment(x, y), w), num_parallel_calls=1)
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
    p = np.sum(
        [w * q for w, q in ((clf.cnn_weight, p_cnn), (1 - clf.cnn_weight, p_cls)) if q is not None and w > 0], axis=0
    )
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
