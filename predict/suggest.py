"""Suggestions for the faces a person may still sort: the current model's best guess, never a label."""

from __future__ import annotations

import logging

from sqlmodel import col, select

from core.logs import kv
from core.settings import Settings
from db.engine import session_scope
from db.models import Face, FaceState, LabelSource, pk
from train.registry import current_version

log = logging.getLogger("waifu.retrain")


def suggest_for_ambiguous(settings: Settings, face_ids: list[int] | None = None) -> int:
    """Attaches the current model's best guess to ambiguous and inferred faces (the ones a person may still
    sort or check): a suggestion, never a label."""
    from train.features import load_images
    from train.model import load_artifacts, predict

    with session_scope() as session:
        current = current_version(session)
        query = select(Face).where(
            Face.state == FaceState.ready,
            col(Face.label_source).in_([LabelSource.ambiguous, LabelSource.inferred]),
        )
        if face_ids is not None:
            query = query.where(col(Face.id).in_(face_ids))
        faces = [(pk(f), f.path) for f in session.exec(query.order_by(col(Face.id))).all() if f.path]  # ready: cropped
    if current is None or not current.artifact_dir or not faces:
        return 0
    classifier = load_artifacts(settings.data_dir / current.artifact_dir)
    done = 0
    for start in range(0, len(faces), 256):
        batch = faces[start : start + 256]
        images = load_images([str(settings.data_dir / p) for _, p in batch], settings.face_size)
        probabilities = predict(classifier, images)
        with session_scope() as session:
            for (face_id, _), row in zip(batch, probabilities, strict=True):
                face = session.get(Face, face_id)
                if face is None:  # deleted meanwhile
                    continue
                best = int(row.argmax())
                face.suggestion, face.suggestion_score = classifier.class_names[best], float(row[best])
                done += 1
    log.info(kv("suggestions", model=current.id, faces=done))
    return done
