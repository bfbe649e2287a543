"""The model registry and the training data, read from the database (no broker, no TensorFlow):
which faces are trainable, which model version is current."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import Session, col, func, select

from core.settings import Settings
from db.models import Face, FaceState, LabelSource, ModelStatus, ModelVersion

# trained on and evaluated on; a `tag` face with a doubt (labels.weak) is neither until the doubt is gone
TRAINABLE = (LabelSource.tag, LabelSource.manual)
# trained on in the train split only, never evaluated on: the model's own guess from the post's tags
TRAIN_ONLY = (LabelSource.inferred,)


def sources_for(split: str) -> tuple[LabelSource, ...]:
    return TRAINABLE + TRAIN_ONLY if split == "train" else TRAINABLE


def labelled_faces(session: Session, settings: Settings, split: str) -> list[tuple[Path, str]]:
    rows = session.exec(
        select(Face.path, Face.label)
        .where(
            Face.state == FaceState.ready,
            col(Face.label).is_not(None),
            col(Face.label_source).in_(sources_for(split)),
            col(Face.doubt_score).is_(None),
            Face.split == split,
        )
        .order_by(col(Face.id))
    ).all()
    return [(settings.data_dir / path, label) for path, label in rows if path and label]  # ready, labelled


def labelled_count(session: Session) -> int:
    """Faces labelled by tag or by hand (what the retrain rule counts): inferred labels are the model's
    own output and doubts come and go with each retrain, so neither moves this number."""
    return int(
        session.exec(
            select(func.count())
            .select_from(Face)
            .where(Face.state == FaceState.ready, col(Face.label).is_not(None), col(Face.label_source).in_(TRAINABLE))
        ).one()
    )


def current_version(session: Session) -> ModelVersion | None:
    return session.exec(
        select(ModelVersion).where(ModelVersion.status == ModelStatus.current).order_by(col(ModelVersion.id).desc())
    ).first()


def inferred_trained_count(session: Session) -> int:
    """Inferred labels a retrain would train on now (train split, not doubtful)."""
    return int(
        session.exec(
            select(func.count())
            .select_from(Face)
            .where(
                Face.state == FaceState.ready,
                col(Face.label).is_not(None),
                Face.label_source == LabelSource.inferred,
                Face.split == "train",
            )
        ).one()
    )
