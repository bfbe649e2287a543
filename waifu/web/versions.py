"""The model versions the models page and the API list: each with its per-class counts and metrics and the
pictures its retrain wrote, as plain functions over the database."""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlmodel import Session, col, select

from db.models import ModelVersion


@dataclass
class VersionRow:
    version: ModelVersion
    counts: dict[str, int]
    per_class: dict[str, dict[str, float]]
    test_faces: int | None
    pictures: list[str]  # artifact names that exist


MODEL_PICTURES = ("training_curves.png", "confusion_matrix.png")


def json_object(text: str | None) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def model_versions(session: Session, data_dir) -> list[VersionRow]:
    rows = []
    for version in session.exec(select(ModelVersion).order_by(col(ModelVersion.id).desc())).all():
        metrics = json_object(version.metrics)
        pictures = [
            name
            for name in MODEL_PICTURES
            if version.artifact_dir and (data_dir / version.artifact_dir / name).is_file()
        ]
        rows.append(
            VersionRow(version, json_object(version.counts), metrics.get("per_class", {}), metrics.get("n"), pictures)
        )
    return rows
