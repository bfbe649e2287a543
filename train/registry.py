"""The model registry and the training data, read from the database (no broker, no TensorFlow):
which faces are trainable, which model version is current."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import Session, col, func, select

from core.settings import Settings
from db.models import Face, FaceState, LabelSource, ModelStatus, ModelVersion

TRAINABLE = (LabelSource.tag, LabelSource.manual)


def labelled_faces(session: Session, settings: Settings, split: str) -> list[tuple[Path, str]]:
    rows = session.exec(
        select(Face.path, Face.label).where(
            Face.state == FaceState.ready, col(Face.label).is_not(None), col(Face.label_source).in_(TRAINABLE),
            Face.split == split,
        ).order_by(Face.id)
    ).all()
    return [(settings.data_dir / path, label) for path, label in rows]


def labelled_count(session: Session) -> int:
    return int(session.exec(select(func.count()).select_from(Face).where(
        Face.state == FaceState.ready, col(Face.label).is_not(None), col(Face.label_source).in_(TRAINABLE))).one())


def current_version(session: Session) -> ModelVersion | None:
    return session.exec(select(ModelVersion).where(ModelVersion.status == ModelStatus.current)
                        .order_by(col(ModelVersion.id).desc())).first()
