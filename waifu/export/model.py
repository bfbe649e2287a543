"""`waifu model export DIR [--version N]`: a model version in formats others serve, and what it expects.

Design notes: docs/architecture.md, `waifu/export/model.py`.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlmodel import col, select

from core.logs import kv
from core.settings import Settings
from db.engine import session_scope
from db.models import Face, FaceState, ModelStatus, ModelVersion, pk
from waifu.export.atomic import clean_leftovers, staging_dir, swap_in

log = logging.getLogger("waifu.export")

MANIFEST = "model.json"
MANIFEST_KIND = "waifu-model-export"
ONNX_OPSET = 17
SELF_CHECK_FACES = 256  # test faces the exported graph is compared on (bounded work)
SELF_CHECK_TOLERANCE = 1e-3  # largest probability difference accepted between the graph and predict


class ModelExportError(RuntimeError):
    """No such version, no artifacts, a destination that is not an export, a graph that disagrees."""


@dataclass
class ModelExportResult:
    directory: Path
    version: int
    files: dict[str, str] = field(default_factory=dict)  # file -> what it is, or why it is missing


def _version_row(version: int | None) -> ModelVersion:
    with session_scope(readonly=True) as session:
        if version is None:
            row = session.exec(
                select(ModelVersion)
                .where(ModelVersion.status == ModelStatus.current)
                .order_by(col(ModelVersion.id).desc())
            ).first()
            if row is None:
                raise ModelExportError("no current model yet: run `waifu retrain --wait` first, or give --version")
        else:
            row = session.get(ModelVersion, version)
            if row is None:
                raise ModelExportError(f"no model version {version}")
    if not row.artifact_dir:
        raise ModelExportError(f"model version {row.id} has no artifacts (status {row.status}: {row.reason or '-'})")
    return row


def _check_destination(destination: Path) -> None:
    if not destination.exists():
        return
    manifest = destination / MANIFEST
    ours = False
    if manifest.is_file():
        try:
            ours = json.loads(manifest.read_text()).get("kind") == MANIFEST_KIND
        except ValueError:
            ours = False
    if not destination.is_dir() or (not ours and any(destination.iterdir())):
        raise ModelExportError(f"{destination} exists and is not a model export; choose another folder")


def _test_faces(settings: Settings, class_names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Up to SELF_CHECK_FACES ready test faces of the model's classes (uint8 96x96), with their labels."""
    from train.features import load_images

    with session_scope(readonly=True) as session:
        rows = session.exec(
            select(Face.path, Face.label)
            .where(Face.state == FaceState.ready, Face.split == "test", col(Face.label).in_(class_names))
            .order_by(col(Face.id))
            .limit(SELF_CHECK_FACES)
        ).all()
    found = [(p, label) for p, label in rows if p and label and (settings.data_dir / p).is_file()]
    images = load_images([str(settings.data_dir / p) for p, _ in found], settings.face_size)
    return images, [label for _, label in found]


def _self_check(expected: np.ndarray, got: np.ndarray, what: str) -> dict[str, Any]:
    diff = float(np.abs(expected - got).max()) if len(expected) else 0.0
    same = int((expected.argmax(1) == got.argmax(1)).sum()) if len(expected) else 0
    check = {"faces": int(len(expected)), "same_top1": same, "max_probability_difference": round(diff, 7)}
    if diff > SELF_CHECK_TOLERANCE:
        raise ModelExportError(f"{what} disagrees with waifu predict on the test faces: {check}")
    return check


def _convert_onnx(module: Any, face_size: int, path: Path) -> str:
    """Writes model.onnx with tf2onnx; returns a note, or raises with what failed."""
    import tensorflow as tf
    import tf2onnx

    from waifu.export.graph import INPUT_SPEC

    spec = (INPUT_SPEC(tf, face_size),)
    tf2onnx.convert.from_function(module.serve, input_signature=spec, opset=ONNX_OPSET, output_path=str(path))
    return f"tf2onnx {tf2onnx.__version__}, opset {ONNX_OPSET}"


def _run_onnx(path: Path, faces: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: faces.astype(np.float32)})[0]


def _manifest(row: ModelVersion, clf: Any, settings: Settings, files: dict[str, str], checks: dict) -> dict:
    import keras
    import tensorflow as tf

    hyper = json.loads(row.hyperparameters or "{}")
    return {
        "kind": MANIFEST_KIND,
        "format": 1,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": row.id,
        "status": row.status,
        "trained_at": row.created_at.isoformat() if row.created_at else None,
        "code_version": row.code_version,
        "class_names": clf.class_names,
        "input": {
            "name": "faces",
            "shape": [None, settings.face_size, settings.face_size, 3],
            "dtype": "float32",
            "channels": "RGB",
            "range": [0, 255],
            "what": "a face crop (see crop); pixels as they are, no scaling nor mean subtraction: the graph does it",
        },
        "crop": {
            "margin": settings.face_margin,
            "size": settings.face_size,
            "rule": (
                "side = round(max(w, h) * (1 + 2 * margin)), at most the picture's width and height; a square of that "
                "side centred on the detection's box (left = round(x + w/2 - side/2), same for top), shifted to lie "
                "inside the picture; cut from the upright RGB picture and resized to size x size with Lanczos"
            ),
        },
        "output": {
            "name": "probabilities",
            "shape": [None, len(clf.class_names)],
            "what": "one probability per class (order of class_names), summing to 1",
        },
        "preprocessing_inside": {
            "cnn": f"{clf.cnn_backbone} at {clf.cnn_size} px (bilinear resize), pixels / 127.5 - 1",
            "classical": "HOG + HSV/Lab colour histograms on a 64 px copy (Pillow bilinear), logistic regression",
            "mirror_averaging": bool(clf.config.tta),
            "cnn_weight": clf.cnn_weight,
            "temperatures": {"cnn": clf.temperature_cnn, "classical": clf.temperature_classical},
        },
        "unknown": {
            "threshold": clf.threshold,
            "rule": "a face whose best probability is under the threshold is `unknown` (its best guess still shown)",
            "how_chosen": clf.info.get("threshold_rule", ""),
            "by_percentile": clf.info.get("threshold_by_percentile", {}),
        },
        "metrics": {
            "accuracy": row.accuracy,
            "macro_f1": row.macro_f1,
            "compared_with_current": row.current_accuracy,
            "test": json.loads(row.metrics or "{}"),
            "train_counts": json.loads(row.counts or "{}"),
        },
        "hyperparameters": hyper,
        "keras_model": {
            "file": "model.keras" if clf.keras_model is not None else None,
            "what": (
                f"the CNN part alone: float RGB 0..255 at {clf.cnn_size}x{clf.cnn_size} -> class logits; "
                "the ensemble's answer needs the classical part too (saved_model/ or model.onnx)"
            ),
        },
        "files": files,
        "self_check": checks,
        "built_with": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }


def export_model(settings: Settings, destination: Path, version: int | None = None, onnx: bool = True):
    """Writes model version `version` (default: the current one) to `destination` (module docstring)."""
    destination = destination.absolute()
    row = _version_row(version)  # refusals come before TensorFlow is imported: they answer at once
    _check_destination(destination)

    import tensorflow as tf

    from train.model import KERAS_FILE, load_artifacts
    from train.model import predict as waifu_predict
    from waifu.export.graph import EnsembleGraph, NotExportable

    clean_leftovers(destination)
    assert row.artifact_dir  # _version_row refuses a version without artifacts
    artifacts = settings.data_dir / row.artifact_dir
    try:
        clf = load_artifacts(artifacts)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelExportError(f"model version {row.id}: artifacts at {artifacts} unreadable ({exc})") from exc
    try:
        module = EnsembleGraph(clf, settings.face_size).module()
    except NotExportable as exc:
        raise ModelExportError(f"model version {row.id}: {exc}") from exc
    faces, _ = _test_faces(settings, clf.class_names)
    expected = waifu_predict(clf, faces) if len(faces) else np.zeros((0, len(clf.class_names)))
    result = ModelExportResult(destination, pk(row))
    checks: dict[str, Any] = {}
    staging = staging_dir(destination)
    try:
        if clf.keras_model is not None:
            shutil.copyfile(artifacts / KERAS_FILE, staging / KERAS_FILE)
            result.files[KERAS_FILE] = "the CNN part alone (Keras 3)"
        else:
            result.files[KERAS_FILE] = "not written: this version has no CNN (classical model alone)"
        signature = module.serve.get_concrete_function()
        tf.saved_model.save(module, str(staging / "saved_model"), signatures={"serving_default": signature})
        got = module.serve(tf.constant(faces, tf.float32))["probabilities"].numpy() if len(faces) else expected
        checks["saved_model"] = _self_check(expected, got, "the SavedModel graph")
        result.files["saved_model/"] = "the whole classifier (TensorFlow SavedModel, signature serving_default)"
        if onnx:
            result.files["model.onnx"] = _onnx(module, settings, staging, faces, expected, checks)
        manifest = _manifest(row, clf, settings, result.files, checks)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_plain))
        result.files[MANIFEST] = "classes, input, preprocessing, unknown threshold, metrics"
        swap_in(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(kv("model export done", version=row.id, directory=str(destination)))
    return result


def _onnx(module: Any, settings: Settings, staging: Path, faces: np.ndarray, expected: np.ndarray, checks) -> str:
    """model.onnx with its own self-check; on failure the reason, and model.onnx is not written."""
    path = staging / "model.onnx"
    try:
        note = _convert_onnx(module, settings.face_size, path)
    except Exception as exc:  # the converter's failure is the answer: recorded in model.json and printed
        path.unlink(missing_ok=True)
        first_line = (str(exc).splitlines() or [""])[0][:300]
        why = f"not written: tf2onnx failed ({type(exc).__name__}: {first_line})"
        log.warning(kv("onnx export failed", error=why))
        checks["onnx"] = why
        return why
    try:
        got = _run_onnx(path, faces) if len(faces) else expected
    except ImportError:
        checks["onnx"] = "not checked: onnxruntime is not installed"
        return note + " (not checked: onnxruntime missing)"
    try:
        checks["onnx"] = _self_check(expected, got, "the ONNX graph")
    except ModelExportError as exc:  # the SavedModel is right; a converter's error must not ship
        path.unlink(missing_ok=True)
        checks["onnx"] = f"not written: {exc}"
        log.warning(kv("onnx export disagrees", error=str(exc)))
        return checks["onnx"]
    return f"the whole classifier as ONNX ({note})"


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
