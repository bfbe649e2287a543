"""Train, evaluate, save and load the face classifier: plain functions the retrain and predict steps call.

TensorFlow is imported only inside functions, never at import, so Celery's parent process and the CLI
stay light and fork-safe. The design and its figures: docs/model.md. This package's public names are
re-exported here; each lives in the module named for its job.
"""

from train.model.artifacts import load_artifacts, save_artifacts
from train.model.backbones import build_model, build_resnet, mobilenet_file_name, obtain_weights
from train.model.calibration import choose_weight, fit_temperature, sharpen, unknown_threshold
from train.model.classifier import Classifier, name_of, predict, predict_labels, top_k
from train.model.config import (
    BACKBONES,
    FORMAT,
    KERAS_FILE,
    LABELS_FILE,
    LINEAR_FILE,
    MANIFEST_FILE,
    UNKNOWN,
    WEIGHTS_SETTING,
    BackboneWeightsError,
    TrainConfig,
    plan_cnn,
)
from train.model.data import Dataset, items_from_dir, load_dataset, stratified_split
from train.model.fitting import TrainResult, fit_cnn, train
from train.model.metrics import Metrics, evaluate, metrics_from_predictions, unknown_summary

__all__ = [
    "BACKBONES", "FORMAT", "KERAS_FILE", "LABELS_FILE", "LINEAR_FILE", "MANIFEST_FILE", "UNKNOWN",
    "WEIGHTS_SETTING", "BackboneWeightsError", "Classifier", "Dataset", "Metrics", "TrainConfig",
    "TrainResult", "build_model", "build_resnet", "choose_weight", "evaluate", "fit_cnn", "fit_temperature",
    "items_from_dir", "load_artifacts", "load_dataset", "metrics_from_predictions", "mobilenet_file_name",
    "name_of", "obtain_weights", "plan_cnn", "predict", "predict_labels", "save_artifacts", "sharpen",
    "stratified_split", "top_k", "train", "unknown_summary", "unknown_threshold",
]  # fmt: skip
