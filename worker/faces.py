"""The face pipeline's plain functions: detect faces of a downloaded post, write each 96x96 crop,
label it, find near-duplicates, and give it a stable train/test split.

The Celery tasks in worker.tasks are thin shells around `detect_post` and `resize_face`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from sqlmodel import Session, col, select

from db.engine import session_scope
from db.models import Character, Face, FaceState, LabelSource, Post, PostCharacter, PostState, Split, utcnow
from db.states import transition
from waifu.logs import kv
from waifu.settings import Settings

log = logging.getLogger("waifu.faces")


@dataclass
class DetectOutcome:
    state: str | None
    face_ids: list[int] = field(default_factory=list)


# ------------------------------------------------------------------------ pure rules ----------
def split_for(sha256: str, test_fraction: float) -> Split:
    """A stable function of the crop's hash: adding data or retraining never moves a face."""
    bucket = int(sha256[:12], 16) / float(1 << 48)
    return Split.test if bucket < test_fraction else Split.train


def label_for(tracked_tags: list[str], faces_in_post: int) -> tuple[str | None, LabelSource]:
    """`tag` only when the post names exactly one tracked character and holds exactly one face."""
    if len(tracked_tags) == 1 and faces_in_post == 1:
        return tracked_tags[0], LabelSource.tag
    return None, LabelSource.ambiguous


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def perceptual_hash(image: Image.Image) -> str:
    import imagehash

    return str(imagehash.phash(image))


def find_original(session: Session, face_id: int | None, phash: str, max_distance: int) -> Face | None:
    """The earliest ready face that shows the same picture (reposted, resized or recompressed)."""
    best: Face | None = None
    rows = session.exec(
        select(Face).where(Face.state == FaceState.ready, col(Face.phash).is_not(None)).order_by(Face.id)
    )
    for other in rows:
        if other.id == face_id:
            continue
        if hamming(other.phash, phash) <= max_distance:
            best = other.duplicate_of and session.get(Face, other.duplicate_of) or other
            break
    return best


# ------------------------------------------------------------------------ files ---------------
def open_post_image(post: Post, settings: Settings) -> Image.Image:
    if not post.stored_path:
        raise FileNotFoundError(f"post {post.id} has no stored file")
    path = settings.data_dir / post.stored_path
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    from worker.imaging import to_rgb

    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


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


# ------------------------------------------------------------------------ steps ---------------
def detect_post(post_id: int, settings: Settings) -> DetectOutcome:
    """Detects every face of a downloaded post; a post without a face ends `done` with faces=0."""
    from worker.detect import DetectorUnavailable, detect_faces, pin_opencv_threads
    from worker.imaging import square_crop_box

    pin_opencv_threads()
    with session_scope() as session:
        # the row lock makes a duplicate message wait, then see `detected`, instead of detecting twice
        post = session.get(Post, post_id, with_for_update=True)
        if post is None or post.state != PostState.downloaded:
            return DetectOutcome(post.state if post else None)
        try:
            image = open_post_image(post, settings)
            detections = detect_faces(image, settings.detector)
        except DetectorUnavailable as exc:
            # the machine's fault, not the image's: the row waits (reconcile retries it), it does not fail
            post.reason = f"waiting for the detector: {exc}"
            post.updated_at = utcnow()
            log.error(kv("detector unavailable", post=post.id, error=exc))
            return DetectOutcome(post.state)
        except Exception as exc:  # a bad file must not stop the queue; the row says what happened
            post.attempts += 1
            transition(post, PostState.failed, f"face detection failed: {type(exc).__name__}: {exc}")
            return DetectOutcome(PostState.failed)
        faces = []
        for det in detections:
            left, top, right, bottom = square_crop_box(det, image.size, settings.face_margin)
            faces.append(Face(post_id=post.id, detector=det.detector, score=det.score, x=det.x, y=det.y, w=det.w,
                              h=det.h, crop_left=left, crop_top=top, crop_right=right, crop_bottom=bottom))
        session.add_all(faces)
        post.faces = len(faces)
        if faces:
            transition(post, PostState.detected)
        else:
            transition(post, PostState.done, "no face found")
        session.flush()
        return DetectOutcome(post.state, [f.id for f in faces])


def tracked_tags(session: Session, post_id: int) -> list[str]:
    return sorted(session.exec(
        select(Character.tag).join(PostCharacter, PostCharacter.character_id == Character.id)
        .where(PostCharacter.post_id == post_id)
    ).all())


def resize_face(face_id: int, settings: Settings) -> str | None:
    """Writes the crop named by its hash, labels it, splits it; the face becomes `ready`."""
    from worker.imaging import crop_face

    with session_scope() as session:
        face = session.get(Face, face_id)
        if face is None:
            return None
        # faces of one post finish one at a time: the last one must see the others `ready` to close the post
        post = session.get(Post, face.post_id, with_for_update=True)
        session.refresh(face)
        if face.state != FaceState.detected:
            return face.state
        try:
            image = open_post_image(post, settings)
            crop = crop_face(image, (face.crop_left, face.crop_top, face.crop_right, face.crop_bottom),
                             size=settings.face_size)
        except Exception as exc:
            face.state, face.reason, face.updated_at = FaceState.failed, f"crop failed: {exc}", utcnow()
            log.warning(kv("face failed", face=face.id, post=post.id, reason=face.reason))
            finish_post_if_complete(session, post)
            return face.state
        buffer = io.BytesIO()
        crop.save(buffer, format="PNG", optimize=True)
        data = buffer.getvalue()
        face.sha256 = hashlib.sha256(data).hexdigest()
        face.path = f"faces/{face.sha256[:2]}/{face.sha256}.png"
        write_atomic(settings.data_dir / face.path, data)
        face.phash = perceptual_hash(crop)

        original = find_original(session, face.id, face.phash, settings.near_duplicate_distance)
        face.duplicate_of = original.id if original else None
        face.split = original.split if original and original.split else split_for(face.sha256, settings.test_fraction)
        if face.label_source != LabelSource.manual:
            face.label, face.label_source = label_for(tracked_tags(session, post.id), post.faces or 0)
        face.state, face.updated_at = FaceState.ready, utcnow()
        log.info(kv("face ready", face=face.id, post=post.id, label=face.label, source=face.label_source,
                    split=face.split, duplicate_of=face.duplicate_of))
        finish_post_if_complete(session, post)
        return face.state


def finish_post_if_complete(session: Session, post: Post) -> None:
    """A post is `done` once none of its faces still waits for its crop."""
    session.flush()
    waiting = session.exec(
        select(Face.id).where(Face.post_id == post.id, Face.state == FaceState.detected)
    ).first()
    if waiting is None and post.state == PostState.detected:
        transition(post, PostState.done)


# ------------------------------------------------------------------------ manual cleaning -----
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
