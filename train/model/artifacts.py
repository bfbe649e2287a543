"""Saving and loading a trained classifier as one directory (model.keras, classical.npz, model.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from train.features import LinearModel
from train.model.backbones import _keras
from train.model.classifier import Classifier
from train.model.config import FORMAT, KERAS_FILE, LABELS_FILE, LINEAR_FILE, MANIFEST_FILE, TrainConfig
from train.model.metrics import Metrics


def save_artifacts(classifier: Classifier, directory: str | Path, metrics: Metrics | None = None) -> Path:
    """One directory: model.keras (if a CNN), classical.npz, labels.json, model.json (weights, temperatures,
    threshold, config, validation info), metrics.json."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if classifier.keras_model is not None:
        classifier.keras_model.save(d / KERAS_FILE)
    if classifier.linear is not None:
        np.savez(d / LINEAR_FILE, **classifier.linear.arrays(""))  # type: ignore[arg-type]  # numpy's stub matches **kwds against allow_pickle
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
