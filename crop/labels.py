"""Manual cleaning: a person names or rejects a face. The CLI (`waifu faces`) and the web page both go
through these functions."""

from __future__ import annotations

import logging

from sqlmodel import select

from core.logs import kv
from db.engine import session_scope
from db.models import Character, Face, FaceState, LabelSource, utcnow

log = logging.getLogger("waifu.labels")


def set_manual_label(face_id: int, tag: str | None) -> Face:
    """`waifu faces label` (tag) or `waifu faces reject` (None): overrides the automatic label."""
    with session_scope() as session:
        face = session.get(Face, face_id)
        if face is None:
            raise LookupError(f"no face with id {face_id}")
        if tag is None:
            face.state, face.label, face.label_source = FaceState.rejected, None, LabelSource.manual
        else:
            known = session.exec(select(Character).where(Character.tag == tag)).first()
            if known is None:
                raise LookupError(f"{tag!r} is not a tracked character (add it with `waifu characters add`)")
            face.label, face.label_source = tag, LabelSource.manual
            if face.state == FaceState.rejected:
                face.state = FaceState.ready if face.path else FaceState.detected
        face.updated_at = utcnow()
        log.info(kv("face labelled", face=face.id, label=face.label, state=face.state, source="manual"))
        return face
