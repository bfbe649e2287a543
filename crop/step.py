"""The crop step on a face row: claim it, cut and encode the crop with no transaction open, then record
it (file named by its hash, near-duplicate, split, label) only if the face is still ours. The last face
of a post to finish closes the post (`done`)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from pathlib import Path

from sqlmodel import Session, col, select

from core.errors import Refused
from core.images import open_image
from core.logs import kv
from core.outcome import StepOutcome
from core.settings import Settings
from crop.neardup import find_near_duplicate, index_face, perceptual_hash
from db.claims import claim, new_token, peek, state_of, still_claimed
from db.models import Character, Face, FaceState, LabelSource, Post, PostCharacter, PostState, pk, utcnow
from db.states import transition
from labels.rules import label_for, split_for, split_for_labelled
from labels.splits import character_splits

log = logging.getLogger("waifu.crop")

WAITING = FaceState.detected


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tracked_tags(session: Session, post_id: int) -> list[str]:
    return sorted(
        session.exec(
            select(Character.tag)
            .join(PostCharacter, col(PostCharacter.character_id) == Character.id)
            .where(PostCharacter.post_id == post_id)
        ).all()
    )


def crop_face(face_id: int, settings: Settings, token: str | None = None) -> StepOutcome:
    """Writes the crop named by its hash, labels it, splits it; the face becomes `ready`."""
    from crop.imaging import crop_face as cut

    token = token or new_token()
    face = claim(Face, face_id, WAITING, token, settings.claim_timeout_s)
    if face is None:
        return state_of(Face, face_id)
    post = peek(Post, face.post_id)
    try:
        if post is None or not post.stored_path:
            raise Refused("its post has no stored picture")
        image = open_image(settings.data_dir / post.stored_path, settings.max_image_pixels)
        crop = cut(image, (face.crop_left, face.crop_top, face.crop_right, face.crop_bottom), size=settings.face_size)
        buffer = io.BytesIO()
        crop.save(buffer, format="PNG", optimize=True)
        data = buffer.getvalue()
        sha256 = hashlib.sha256(data).hexdigest()
        relative = f"faces/{sha256[:2]}/{sha256}.png"
        write_atomic(settings.data_dir / relative, data)  # named by content: a lost race writes the same bytes
        phash = perceptual_hash(crop)
    except Exception as exc:
        return record_failed(face_id, token, f"crop failed: {exc}")

    with still_claimed(Face, face_id, WAITING, token) as (session, face):
        if face is None:
            return state_of(Face, face_id)
        # faces of one post finish one at a time: the last one must see the others `ready` to close the post
        post = _post_of(session, face)
        face.sha256, face.path, face.phash = sha256, relative, phash
        original = find_near_duplicate(session, pk(face), phash, settings.near_duplicate_distance)
        face.duplicate_of = original.id if original else None
        if face.label_source != LabelSource.manual:
            # post.faces counts the faces the check accepted: a filtered detection does not make it ambiguous
            face.label, face.label_source = label_for(tracked_tags(session, pk(post)), post.faces or 0)
        if original and original.split:
            face.split = original.split  # a near-duplicate never sits across the split from its original
        elif face.label:
            train, test = character_splits(session, face.label)
            face.split = split_for_labelled(train, test, settings.test_fraction, settings.min_train_faces)
        else:
            face.split = split_for(sha256, settings.test_fraction)
        face.state, face.updated_at = FaceState.ready, utcnow()
        index_face(session, face)
        log.info(
            kv(
                "face ready",
                face=face.id,
                post=post.id,
                label=face.label,
                source=face.label_source,
                split=face.split,
                duplicate_of=face.duplicate_of,
            )
        )
        finish_post_if_complete(session, post)
        return StepOutcome(face.state)


def _post_of(session: Session, face: Face) -> Post:
    """The face's post, locked (a face never outlives its post: a foreign key)."""
    post = session.get(Post, face.post_id, with_for_update=True)
    if post is None:
        raise LookupError(f"face {face.id}: no post {face.post_id}")
    return post


def record_failed(face_id: int, token: str, reason: str) -> StepOutcome:
    with still_claimed(Face, face_id, WAITING, token) as (session, face):
        if face is None:
            return state_of(Face, face_id)
        post = _post_of(session, face)
        face.state, face.reason, face.updated_at = FaceState.failed, reason[:2000], utcnow()
        log.warning(kv("face failed", face=face.id, post=face.post_id, reason=face.reason))
        finish_post_if_complete(session, post)
        return StepOutcome(face.state, face.reason)


def finish_post_if_complete(session: Session, post: Post) -> None:
    """A post is `done` once none of its faces still waits for its crop."""
    session.flush()
    waiting = session.exec(select(Face.id).where(Face.post_id == post.id, Face.state == FaceState.detected)).first()
    if waiting is None and post.state == PostState.detected:
        transition(post, PostState.done)
