"""`waifu report`: PNGs and one HTML page about the current model and the collected faces."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

from sqlmodel import col, select

from core.settings import Settings
from db.engine import session_scope
from db.models import Face, FaceState, ModelVersion
from train.charts import face_grid_png, growth_png
from train.registry import TRAINABLE, current_version

GRID_FACES = 30


def growth_series(settings: Settings) -> dict[str, list[tuple]]:
    with session_scope() as session:
        rows = session.exec(
            select(Face.label, Face.created_at)
            .where(
                Face.state == FaceState.ready,
                col(Face.label).is_not(None),
                col(Face.label_source).in_(TRAINABLE),
            )
            .order_by(col(Face.created_at))
        ).all()
    series: dict[str, list[tuple]] = {}
    for label, created in rows:
        if label is None:  # filtered out above
            continue
        points = series.setdefault(label, [])
        points.append((created, len(points) + 1))
    return series


def test_split_grid(settings: Settings, version: ModelVersion, out: Path) -> Path | None:
    import numpy as np

    from train.features import load_images
    from train.model import load_artifacts, predict

    with session_scope() as session:
        faces = session.exec(
            select(Face.path, Face.label)
            .where(
                Face.state == FaceState.ready,
                Face.split == "test",
                col(Face.label).is_not(None),
                col(Face.label_source).in_(TRAINABLE),
            )
            .order_by(col(Face.id))
            .limit(GRID_FACES)
        ).all()
    pictures = [(path, label) for path, label in faces if path and label]  # ready and labelled: both set
    if not pictures or not version.artifact_dir:
        return None
    classifier = load_artifacts(settings.data_dir / version.artifact_dir)
    images = load_images([str(settings.data_dir / p) for p, _ in pictures], settings.face_size)
    predicted = np.asarray(predict(classifier, images)).argmax(axis=1)
    captions = [(classifier.class_names[i], label) for i, (_, label) in zip(predicted, pictures, strict=True)]
    return face_grid_png(list(images), captions, out / "test_predictions.png")


def write_report(settings: Settings, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    pictures: list[tuple[str, str]] = []
    with session_scope() as session:
        version = current_version(session)
        history = list(session.exec(select(ModelVersion).order_by(col(ModelVersion.id).desc()).limit(10)).all())
    growth = growth_png(growth_series(settings), out / "faces_over_time.png")
    pictures.append(("Labelled faces per character over time", growth.name))
    metrics: dict = {}
    if version is not None and version.artifact_dir:
        source = settings.data_dir / version.artifact_dir
        for name, title in (("training_curves.png", "Training curves"), ("confusion_matrix.png", "Confusion matrix")):
            if (source / name).exists():
                shutil.copy(source / name, out / name)
                pictures.insert(0, (title, name))
        grid = test_split_grid(settings, version, out)
        if grid:
            pictures.insert(0, (f"{GRID_FACES} test faces: predicted (true)", grid.name))
        metrics = json.loads(version.metrics or "{}")
    (out / "index.html").write_text(render_html(version, metrics, history, pictures))
    return out / "index.html"


def unknown_html(version: ModelVersion, metrics: dict) -> str:
    """How the model says "unknown": its threshold, how it was chosen, what it does on the test split."""
    esc = html.escape
    hyper = json.loads(version.hyperparameters or "{}")
    unknown = metrics.get("unknown") or {}
    threshold = unknown.get("threshold", hyper.get("unknown_threshold"))
    if threshold is None:
        return ""
    rule = unknown.get("rule") or hyper.get("unknown_rule") or "not recorded"
    sweep = ", ".join(f"{q}th: {t:.2f}" for q, t in (unknown.get("threshold_by_percentile") or {}).items())
    effect = ""
    if "share_unknown" in unknown:
        effect = (
            f" On the test split it calls {unknown['share_unknown']:.1%} of the faces unknown; "
            f"{unknown.get('named_right', 0):.1%} are named right, {unknown.get('named_wrong', 0):.1%} wrong."
        )
    plan = hyper.get("plan", "")
    cnn = f" CNN: {esc(str(hyper.get('cnn_backbone', '?')))}, {esc(plan)}." if plan else ""
    return (
        f"<p>Unknown: a face whose best probability is under <b>{threshold:.3f}</b> is called "
        f"<i>unknown</i> (rule: {esc(rule)}; other percentiles: {esc(sweep or '-')}).{esc(effect)}{cnn} "
        f"Ensemble CNN weight {hyper.get('cnn_weight', '?')}; {esc(str(hyper.get('weights_note', '')))}</p>"
    )


def render_html(
    version: ModelVersion | None, metrics: dict, history: list[ModelVersion], pictures: list[tuple[str, str]]
) -> str:
    esc = html.escape
    if version is None:
        head = "<p>No model yet: run <code>waifu retrain --force --wait</code>.</p>"
    else:
        head = (
            f"<p>Current model <b>v{version.id}</b> ({esc(version.created_at.strftime('%Y-%m-%d %H:%M'))} UTC, "
            f"code {esc(version.code_version)}): accuracy <b>{version.accuracy:.3f}</b>, macro-F1 "
            f"<b>{version.macro_f1:.3f}</b> on {metrics.get('n', '?')} test faces. {esc(version.reason or '')}</p>"
            + unknown_html(version, metrics)
        )
    per_class = "".join(
        f"<tr><td>{esc(name)}</td><td>{row['precision']:.2f}</td><td>{row['recall']:.2f}</td>"
        f"<td>{row['f1']:.2f}</td><td>{int(row['support'])}</td></tr>"
        for name, row in metrics.get("per_class", {}).items()
    )
    versions = "".join(
        f"<tr><td>v{v.id}</td><td>{esc(v.status)}</td><td>{'' if v.accuracy is None else f'{v.accuracy:.3f}'}</td>"
        f"<td>{esc(v.reason or '')}</td></tr>"
        for v in history
    )
    figures = "".join(
        f"<figure><img src='{esc(src)}' alt='{esc(title)}'><figcaption>{esc(title)}</figcaption></figure>"
        for title, src in pictures
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>waifu report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px}}img{{max-width:100%}}figure{{margin:2em 0}}</style></head>
<body><h1>waifu report</h1>{head}
<h2>Per character (test split)</h2><table><tr><th>character</th><th>precision</th><th>recall</th><th>F1</th>
<th>faces</th></tr>{per_class}</table>
<h2>Model versions</h2><table><tr><th>version</th><th>status</th><th>accuracy</th><th>why</th></tr>{versions}</table>
{figures}</body></html>
"""
