"""The CNN backbones: the from-scratch ResNet and the pretrained MobileNetV2, with their weights.

TensorFlow is imported inside the functions only (Celery's parent and the CLI stay light)."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from train.model.config import (
    BACKBONES,
    BN_MOMENTUM,
    DOWNLOAD_TIMEOUT_S,
    WEIGHTS_SETTING,
    BackboneWeightsError,
    TrainConfig,
)


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


# a failed ImageNet download, per weights file: (when, why); also written beside the file (FAILED_SUFFIX) so
# a new worker process does not try again either, until weights_retry_s has passed
_FAILED: dict[str, tuple[float, str]] = {}
FAILED_SUFFIX = ".unavailable"


def obtain_weights(config: TrainConfig) -> tuple[str | None, str]:
    """(local weights file or None, what happened). Never raises and never waits long: 'imagenet' is
    looked for under cache_dir, then downloaded there with a short socket timeout and no retries; after a
    failure, not tried again for config.weights_retry_s seconds (remembered in-process and on disk)."""
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
    failed = recent_failure(cached, config.weights_retry_s)
    if failed is not None:
        when, why = failed
        ago = time.time() - when
        return None, (
            f"ImageNet weights unavailable ({why}; not tried again: the download failed {ago:.0f}s ago, "
            f"next attempt after {config.weights_retry_s:.0f}s); trained with weights=none"
        )
    keras = _keras(config.threads)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        path = keras.utils.get_file(name, config.weights_url + name, cache_subdir="models", cache_dir=str(cache))
        return str(path), f"ImageNet weights downloaded to {path}"
    except Exception as exc:  # offline, proxy, disk: the retrain goes on from scratch
        cached.unlink(missing_ok=True)
        why = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        remember_failure(cached, why)
        return None, f"ImageNet weights unavailable ({why}); trained with weights=none"
    finally:
        socket.setdefaulttimeout(previous)


def remember_failure(cached: Path, why: str) -> None:
    now = time.time()
    _FAILED[str(cached)] = (now, why)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.with_name(cached.name + FAILED_SUFFIX).write_text(json.dumps({"at": now, "why": why}))
    except OSError:  # a read-only cache: the in-process memory still holds
        pass


def recent_failure(cached: Path, retry_s: float) -> tuple[float, str] | None:
    """(when, why) of a download failure of this file less than `retry_s` ago, from this process or disk."""
    found = [_FAILED.get(str(cached))]
    try:
        raw = json.loads(cached.with_name(cached.name + FAILED_SUFFIX).read_text())
        found.append((float(raw["at"]), str(raw["why"])))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    recent = [f for f in found if f is not None and time.time() - f[0] < retry_s]
    return max(recent) if recent else None


def forget_failures() -> None:
    """Clears the in-process memory (the disk marker stays until it expires or is deleted)."""
    _FAILED.clear()


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
