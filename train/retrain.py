"""Retraining: load the labelled faces, register a candidate version, fit and evaluate it against the
current model on today's test split in the same run, and promote it only if it is better.

Retraining is not a row step: it runs under a Redis lock, one at a time. TensorFlow is imported only
inside train.model's functions, which this module calls lazily.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session, select

from core import __version__
from core.broker import redis_client
from core.logs import kv
from core.settings import Settings
from db.engine import session_scope
from db.models import ModelStatus, ModelVersion, pk, utcnow
from train.registry import current_version, inferred_trained_count, labelled_count, labelled_faces

log = logging.getLogger("waifu.retrain")

LOCK_NAME = "waifu:retrain-lock"
LOCK_S = 12 * 3600  # a crashed trainer frees the lock after this at the latest
MIN_PER_CLASS = 2


class RetrainBusy(RuntimeError):
    """Another retrain holds the lock."""


class NotEnoughData(RuntimeError):
    """Too few labelled faces to train or to evaluate."""


def retrain_lock(timeout: float = LOCK_S):
    return redis_client().lock(LOCK_NAME, timeout=timeout, blocking=False)


def retrain_running() -> bool:
    return bool(redis_client().exists(LOCK_NAME))


def should_retrain(settings: Settings, first_only: bool = False) -> tuple[bool, str]:
    """The beat rule: retrain only when enough new labelled faces arrived since the current model.
    `first_only` (the frequent check that brings a new collection its first model within minutes, not at
    the next daily check): only while no retrain has left a version of any status."""
    with session_scope(readonly=True) as session:
        if first_only and session.exec(select(ModelVersion.id).limit(1)).first() is not None:
            return False, "a model version exists: the scheduled check decides"
        now = labelled_count(session)
        current = current_version(session)
    before = current.labelled_faces if current else 0
    new = now - before
    if new < settings.retrain_min_new_faces:
        return False, f"only {new} new labelled faces since the current model (need {settings.retrain_min_new_faces})"
    return True, f"{new} new labelled faces"


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def train_config(settings: Settings, overrides: dict[str, Any] | None = None):
    """The chosen design with this service's settings: weights (ImageNet cached under <data_dir>/keras),
    CNN epochs, threads and the CNN time budget."""
    from train.model import TrainConfig

    extra: dict[str, Any] = {
        "cache_dir": str((settings.data_dir / "keras").resolve()),
        "cnn_budget_s": settings.train_cnn_budget_s,
        "weights_retry_s": settings.weights_retry_s,
    }
    if settings.train_epochs:
        extra["epochs"] = settings.train_epochs
    if settings.train_threads:
        extra["threads"] = settings.train_threads
    return TrainConfig.recommended(settings.backbone_weights, **{**extra, **(overrides or {})})


def _weights_reason(config, result) -> str:
    """'' when weights=none was asked for; else what became of the ImageNet/file weights."""
    if config.weights in ("none", ""):
        return ""
    compared = result.classifier.info.get("compared")
    if compared:
        scores = ", ".join(f"{k} {v['validation_accuracy']:.3f}" for k, v in compared.items())
        kept = result.classifier.cnn_backbone
        return f"backbone weights: {result.weights_note}; kept {kept} ({scores} on validation)"
    return f"backbone weights: {result.weights_note}"


def accuracy_on(classifier, images, true_names: list[str]) -> float:
    """Accuracy of any version on today's test faces; a class it never learnt counts as a miss."""
    from train.model import predict

    if not true_names:
        return 0.0
    predicted = predict(classifier, images).argmax(axis=1)
    hits = sum(classifier.class_names[p] == t for p, t in zip(predicted, true_names, strict=True))
    return hits / len(true_names)


def run_retrain(
    settings: Settings,
    progress: Callable[[dict[str, Any]], None] | None = None,
    overrides: dict[str, Any] | None = None,
    loop_round: int = 0,
) -> dict[str, Any]:
    """Trains one version under the lock; returns a summary (status, metrics, reason). `loop_round`: its
    place in a chain of follow-up retrains (train.selftrain), recorded on the version."""
    lock = retrain_lock()
    if not lock.acquire(blocking=False):
        raise RetrainBusy("a retrain is already running")
    try:
        return _retrain(settings, progress, overrides, loop_round)
    finally:
        try:
            lock.release()
        except Exception:  # expired meanwhile: nothing to release
            log.warning(kv("retrain lock already released"))


@dataclass
class RetrainData:
    """What one retrain trains and is judged on, read from the database in one short transaction."""

    classes: list[str]
    train_set: Any  # train.model.Dataset
    test_set: Any  # the test faces of the classes the new model learns
    test_images: Any  # every test face, classes the new model never learnt included
    true_names: list[str]
    labelled: int
    current: ModelVersion | None
    inferred: int = 0  # inferred labels among the training faces


@dataclass
class Trained:
    """A fitted, evaluated and saved candidate, and the current model's score on the same faces."""

    result: Any  # train.model.TrainResult
    metrics: Any  # train.model.Metrics
    accuracy: float
    directory: Path
    current_accuracy: float | None
    unreadable: str  # why the current model could not be scored, or ''


def _retrain(settings: Settings, progress, overrides, loop_round: int = 0) -> dict[str, Any]:
    from labels.splits import rebalance_splits
    from train.spread_inputs import infer_with_spreading
    from train.weak_inputs import judge_tag_labels

    # a character under WAIFU_MIN_TRAIN_FACES gets its test faces back for training (labels.splits)
    splits = rebalance_splits(settings)
    # first judge the tag labels: a face the classical model (trained without it) calls someone else is
    # left out of this retrain until a person decides (labels.weak)
    doubts = judge_tag_labels(settings) if settings.weak_labels else {"reason": "WAIFU_WEAK_LABELS=false"}
    config = train_config(settings, overrides)
    data = load_retrain_data(settings)
    version_id = register_candidate(data, config, loop_round)
    try:
        trained = fit_and_evaluate(settings, data, config, version_id, progress)
    except Exception as exc:
        with session_scope() as session:
            row = _version(session, version_id)
            row.status, row.reason = ModelStatus.failed, f"{type(exc).__name__}: {exc}"[:2000]
        raise
    summary = promote(settings, data, config, version_id, trained)
    # then let the current model (new or kept), spread over the faces' graph, label the ambiguous faces it
    # can tell apart clearly
    summary["doubtful"] = doubts
    summary["splits"] = splits
    off = {"reason": "WAIFU_WEAK_LABELS=false"}
    summary["inferred"] = infer_with_spreading(settings) if settings.weak_labels else off
    summary["loop_round"], summary["inferred_trained"] = loop_round, data.inferred
    record_inferred_change(version_id, summary["inferred"])
    log.info(
        kv(
            "retrain finished",
            version=version_id,
            status=summary["status"],
            accuracy=round(trained.accuracy, 4),
            reason=summary["reason"],
        )
    )
    return summary


def record_inferred_change(version_id: int, counts: dict[str, Any]) -> None:
    """The version's `inferred_changed`: what the inference pass after it changed (None: no pass ran)."""
    from train.selftrain import inferred_change

    with session_scope() as session:
        row = _version(session, version_id)
        row.inferred_changed = None if "reason" in counts else inferred_change(counts)[0]


def load_retrain_data(settings: Settings) -> RetrainData:
    """The labelled train and test faces; refuses (NotEnoughData) when there is nothing to learn or judge."""
    from train.features import load_images
    from train.model import load_dataset

    with session_scope() as session:
        train_items = labelled_faces(session, settings, "train")
        test_items = labelled_faces(session, settings, "test")
        labelled = labelled_count(session)
        current = current_version(session)
        inferred = inferred_trained_count(session)
    counts: dict[str, int] = {}
    for _, label in train_items:
        counts[label] = counts.get(label, 0) + 1
    classes = sorted(c for c, n in counts.items() if n >= MIN_PER_CLASS)
    if len(classes) < 2:
        raise NotEnoughData(f"need 2 characters with >= {MIN_PER_CLASS} labelled train faces; have {counts}")
    test_items = [(p, label) for p, label in test_items if label in counts]
    if not test_items:
        raise NotEnoughData("no labelled test faces yet: nothing to evaluate on")
    size = settings.face_size
    train_set = load_dataset([(p, label) for p, label in train_items if label in classes], classes, size=size)
    test_set = load_dataset(test_items, classes, size=size)
    # faces of characters the new model cannot know still count against it, as for the current model
    test_images = load_images([str(p) for p, _ in test_items], size)
    true_names = [label for _, label in test_items]
    return RetrainData(classes, train_set, test_set, test_images, true_names, labelled, current, inferred)


def register_candidate(data: RetrainData, config, loop_round: int = 0) -> int:
    """A `candidate` model version row, so a retrain that dies is still on record; returns its id."""
    with session_scope() as session:
        version = ModelVersion(
            status=ModelStatus.candidate,
            hyperparameters=json.dumps(config.to_dict()),
            counts=json.dumps(data.train_set.counts()),
            labelled_faces=data.labelled,
            inferred_trained=data.inferred,
            loop_round=loop_round,
            code_version=code_version(),
        )
        session.add(version)
        session.flush()
        version_id = pk(version)
    log.info(
        kv(
            "retrain started",
            version=version_id,
            classes=len(data.classes),
            train=len(data.train_set.labels),
            test=len(data.true_names),
        )
    )
    return version_id


def fit_and_evaluate(settings: Settings, data: RetrainData, config, version_id: int, progress) -> Trained:
    """Train, evaluate and save the candidate, and score the current model on the same test faces."""
    from train.charts import confusion_png, training_curves_png
    from train.model import evaluate, load_artifacts, save_artifacts, train

    result = train(data.train_set, config, progress)
    metrics = evaluate(result.classifier, data.test_set)
    accuracy = accuracy_on(result.classifier, data.test_images, data.true_names)
    directory = settings.models_dir / f"v{version_id}"
    save_artifacts(result.classifier, directory, metrics)
    (directory / "history.json").write_text(json.dumps(result.history))
    training_curves_png(result.history, directory / "training_curves.png")
    confusion_png(metrics.confusion, metrics.class_names, directory / "confusion_matrix.png")
    current_accuracy, unreadable = None, ""
    current = data.current
    if current is not None and current.artifact_dir:
        try:
            previous = load_artifacts(settings.data_dir / current.artifact_dir)
        except (ValueError, KeyError, OSError) as exc:  # an older artifact format, a deleted directory
            unreadable = f"current v{current.id} could not be loaded ({exc}); "
            log.warning(kv("current model unreadable", version=current.id, error=str(exc)))
        else:
            current_accuracy = accuracy_on(previous, data.test_images, data.true_names)
    return Trained(result, metrics, accuracy, directory, current_accuracy, unreadable)


def promote(settings: Settings, data: RetrainData, config, version_id: int, trained: Trained) -> dict[str, Any]:
    """Record the candidate's scores; make it current only if it beats the current model on today's test
    split (tag and manual labels only). Returns the retrain's summary."""
    result, metrics, accuracy, current_accuracy = (
        trained.result,
        trained.metrics,
        trained.accuracy,
        trained.current_accuracy,
    )
    current = data.current
    was = f"v{current.id}" if current else "none"
    with session_scope() as session:
        row = _version(session, version_id)
        row.accuracy, row.macro_f1, row.current_accuracy = accuracy, metrics.macro_f1, current_accuracy
        row.metrics = json.dumps(metrics.to_dict(), default=float)
        row.hyperparameters = json.dumps(hyperparameters(result), default=float)
        row.duration_s = result.duration_s
        row.artifact_dir = trained.directory.relative_to(settings.data_dir).as_posix()
        if current_accuracy is None or accuracy > current_accuracy:
            for old in session.exec(select(ModelVersion).where(ModelVersion.status == ModelStatus.current)):
                old.status, old.reason = ModelStatus.retired, f"replaced by v{version_id} on {utcnow():%Y-%m-%d}"
            row.status = ModelStatus.current
            row.reason = (
                f"{trained.unreadable}first model"
                if current_accuracy is None
                else f"beat {was}: {accuracy:.3f} vs {current_accuracy:.3f} on today's test split"
            )
        else:
            row.status = ModelStatus.candidate
            row.reason = (
                f"did not beat current {was}: {accuracy:.3f} vs {current_accuracy:.3f} "
                f"on today's test split ({len(data.true_names)} faces)"
            )
        weights = _weights_reason(config, result)
        if weights:
            row.reason = f"{row.reason}; {weights}"
        return {
            "status": row.status,
            "version": version_id,
            "accuracy": accuracy,
            "macro_f1": metrics.macro_f1,
            "current_accuracy": current_accuracy,
            "reason": row.reason,
            "test_faces": len(data.true_names),
            "train_faces": int(len(data.train_set.labels)),
            "duration_s": round(result.duration_s, 1),
            "per_class": metrics.per_class,
            "unknown": metrics.unknown,
            "weights": result.weights_note,
            "cnn": result.classifier.cnn_backbone,
        }


def hyperparameters(result) -> dict[str, Any]:
    """What a model version records: the config as trained (CNN size/epochs filled in, and why), what
    became of the weights setting, the ensemble weight, temperatures and the unknown threshold's rule."""
    clf = result.classifier
    info = clf.info
    out = clf.config.to_dict()
    out.update(
        weights_note=result.weights_note,
        cnn_backbone=clf.cnn_backbone,
        cnn_input_size=clf.cnn_size,
        epochs_run=result.epochs_run,
        cnn_weight=clf.cnn_weight,
        temperatures={"cnn": clf.temperature_cnn, "classical": clf.temperature_classical},
        unknown_threshold=clf.threshold,
        unknown_rule=info.get("threshold_rule", ""),
        threshold_by_percentile=info.get("threshold_by_percentile", {}),
        validation={
            k: info[k]
            for k in (
                "validation_accuracy",
                "validation_accuracy_cnn",
                "validation_accuracy_classical",
                "validation_faces",
            )
            if k in info
        },
        compared=info.get("compared", {}),
        seconds={k: info[k] for k in ("classical_s", "cnn_s", "fit_s") if k in info},
    )
    return out


def _version(session: Session, version_id: int) -> ModelVersion:
    """The registered version (this retrain's own row: never deleted while it runs)."""
    row = session.get(ModelVersion, version_id)
    if row is None:
        raise LookupError(f"model version {version_id} is gone")
    return row
