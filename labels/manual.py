"""Manual cleaning: a person names or rejects a face, accepts the model's suggestion, or undoes. The CLI
(`waifu faces`) and the web page both go through these functions.

Design notes: docs/architecture.md.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sqlmodel import Session, col, select

from core.logs import kv
from db.engine import session_scope
from db.models import Character, Face, FaceLabelEvent, FaceState, LabelSource, pk, utcnow

log = logging.getLogger("waifu.labels")

MAX_FACES_PER_ACTION = 1000  # keeps one action's write transaction short
FIELDS = (("state", "state"), ("label", "label"), ("label_source", "source"))  # face attribute, event suffix


@dataclass
class Action:
    """What one call changed: the action id (for undo) and each face as it is now."""

    action: str
    faces: list[Face] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # undo: why a face was left as it is


def set_manual_label(face_id: int, tag: str | None) -> Face:
    """`waifu faces label` (tag) or `waifu faces reject` (None): overrides the automatic label."""
    return label_faces([face_id], tag, origin="cli").faces[0]


def label_faces(face_ids: Iterable[int], tag: str | None, origin: str = "web") -> Action:
    """Gives every face `tag` (a tracked character) by hand, or rejects them (tag None): one action."""
    ids = _checked_ids(face_ids)
    with session_scope() as session:
        faces = _load(session, ids)
        if tag is not None:
            _require_tracked(session, {tag})
        return _apply(session, {pk(face): tag for face in faces}, faces, origin)


def reject_faces(face_ids: Iterable[int], origin: str = "web") -> Action:
    return label_faces(face_ids, None, origin)


def accept_suggestions(face_ids: Iterable[int], origin: str = "web") -> Action:
    """Each face takes the model's suggestion as its manual label: one action. Refused whole when a face
    has no suggestion or its suggestion is no longer a tracked character."""
    ids = _checked_ids(face_ids)
    with session_scope() as session:
        faces = _load(session, ids)
        without = [str(face.id) for face in faces if not face.suggestion]
        if without:
            raise ValueError(f"no suggestion for face {', '.join(without)}: label by hand instead")
        suggested = {pk(face): face.suggestion or "" for face in faces}  # none is empty: refused above
        _require_tracked(session, set(suggested.values()))
        return _apply(session, suggested, faces, origin)


def undo(face_id: int | None = None) -> Action:
    """Undoes the latest action not undone yet (every face it changed), or, given `face_id`, that face's
    latest change only. A field is restored only if it still holds what the action wrote; a face changed
    since by someone else keeps that change (`kept` says which)."""
    with session_scope() as session:
        query = select(FaceLabelEvent).where(col(FaceLabelEvent.undone_at).is_(None))
        if face_id is not None:
            query = query.where(FaceLabelEvent.face_id == face_id)
        latest = session.exec(query.order_by(col(FaceLabelEvent.id).desc())).first()
        if latest is None:
            raise LookupError("nothing to undo" if face_id is None else f"nothing to undo for face {face_id}")
        events = (
            [latest]
            if face_id is not None
            else list(
                session.exec(
                    select(FaceLabelEvent)
                    .where(FaceLabelEvent.action == latest.action, col(FaceLabelEvent.undone_at).is_(None))
                    .order_by(col(FaceLabelEvent.id))
                ).all()
            )
        )
        now = utcnow()
        result = Action(latest.action)
        for event in events:
            face = session.get(Face, event.face_id, with_for_update=True)
            event.undone_at = now
            if face is None:
                continue
            for attribute, suffix in FIELDS:
                before, after = getattr(event, f"before_{suffix}"), getattr(event, f"after_{suffix}")
                if getattr(face, attribute) == after:
                    setattr(face, attribute, before)
                elif before != after:
                    result.kept.append(f"face {face.id}: {attribute} changed since ({getattr(face, attribute)})")
            face.updated_at = now
            result.faces.append(face)
        log.info(kv("faces undone", action=latest.action, faces=len(result.faces), kept=len(result.kept)))
        return result


# ------------------------------------------------------------------------------------ parts ----
def _checked_ids(face_ids: Iterable[int]) -> list[int]:
    ids = list(dict.fromkeys(int(i) for i in face_ids))  # once each, in the order given
    if not ids:
        raise ValueError("no face selected")
    if len(ids) > MAX_FACES_PER_ACTION:
        raise ValueError(f"{len(ids)} faces selected: at most {MAX_FACES_PER_ACTION} per action")
    return ids


def _load(session: Session, ids: list[int]) -> list[Face]:
    found = {f.id: f for f in session.exec(select(Face).where(col(Face.id).in_(ids)).with_for_update()).all()}
    missing = [str(i) for i in ids if i not in found]
    if missing:
        raise LookupError(f"no face with id {', '.join(missing)}")
    return [found[i] for i in ids]


def _require_tracked(session: Session, tags: set[str]) -> None:
    known = set(session.exec(select(Character.tag).where(col(Character.tag).in_(tags))).all())
    unknown = sorted(tags - known)
    if unknown:
        raise LookupError(f"{unknown[0]!r} is not a tracked character (add it with `waifu characters add`)")


def _apply(session: Session, labels: Mapping[int, str | None], faces: list[Face], origin: str) -> Action:
    action = Action(uuid.uuid4().hex)
    now = utcnow()
    for face in faces:
        before = {suffix: getattr(face, attribute) for attribute, suffix in FIELDS}
        tag = labels[pk(face)]
        if tag is None:
            face.state, face.label, face.label_source = FaceState.rejected, None, LabelSource.manual
        else:
            face.label, face.label_source = tag, LabelSource.manual
            if face.state == FaceState.rejected:
                face.state = FaceState.ready if face.path else FaceState.detected
        # a person decided: the model's doubt about the tag label and the inferred margin no longer apply
        face.doubt, face.doubt_score, face.inferred_margin = None, None, None
        face.updated_at = now
        after = {suffix: getattr(face, attribute) for attribute, suffix in FIELDS}
        session.add(
            FaceLabelEvent(
                action=action.action,
                face_id=pk(face),
                origin=origin,
                created_at=now,
                **{f"before_{k}": v for k, v in before.items()},
                **{f"after_{k}": v for k, v in after.items()},
            )
        )
        log.info(
            kv(
                "face labelled",
                face=face.id,
                label=face.label,
                state=face.state,
                source="manual",
                origin=origin,
                action=action.action,
            )
        )
        action.faces.append(face)
    return action
