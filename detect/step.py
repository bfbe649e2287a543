"""The detect step on a post row: claim it, find the faces with no transaction open (seconds of CPU),
then write one Face row per detection only if the post is still ours. A post in which no face is found
ends `done` with faces=0; a file that cannot be read fails with the reason."""

from __future__ import annotations

import logging
import time

from core.errors import DetectorUnavailable, Refused
from core.images import open_image
from core.logs import kv
from core.outcome import StepOutcome
from core.settings import Settings
from db.claims import claim, new_token, peek, release, still_claimed
from db.models import Face, Post, PostState

log = logging.getLogger("waifu.detect")

WAITING = PostState.downloaded


def _now_state(post_id: int) -> StepOutcome:
    row = peek(Post, post_id)
    return StepOutcome(None, reason="no such post") if row is None else StepOutcome(PostState(row.state), row.reason)


def detect_post(post_id: int, settings: Settings, token: str | None = None) -> StepOutcome:
    """Detects every face of a downloaded post and hands the new faces on to the crop step."""
    from crop.imaging import square_crop_box
    from db.states import transition
    from detect.detectors import find_faces, pin_opencv_threads

    pin_opencv_threads()
    token = token or new_token()
    post = claim(Post, post_id, WAITING, token, settings.claim_timeout)
    if post is None:
        return _now_state(post_id)  # gone, past this step, or another worker has it now
    started = time.time()
    try:
        if not post.stored_path:
            raise Refused("no stored file to detect faces in")
        image = open_image(settings.data_dir / post.stored_path, settings.max_image_pixels)
        detections = find_faces(image, settings.detector, settings)
    except DetectorUnavailable as exc:
        # the machine's fault, not the image's: the row waits (reconcile retries it), it does not fail
        release(Post, post_id, token, f"waiting for the detector: {exc}")
        log.error(kv("detector unavailable", post=post_id, error=exc))
        return StepOutcome(PostState.downloaded, reason=str(exc))
    except Exception as exc:  # a bad file must not stop the queue; the row says what happened
        with still_claimed(Post, post_id, WAITING, token) as (_session, row):
            if row is None:
                return _now_state(post_id)
            row.attempts += 1
            detail = str(exc) if isinstance(exc, Refused) else f"{type(exc).__name__}: {exc}"
            transition(row, PostState.failed, f"face detection failed: {detail}")
            return StepOutcome(row.state, row.reason)

    boxes = [square_crop_box(det, image.size, settings.face_margin) for det in detections]
    work = (started, time.time())
    with still_claimed(Post, post_id, WAITING, token) as (session, row):
        if row is None:
            return _now_state(post_id)
        faces = [Face(post_id=row.id, detector=det.detector, score=det.score, x=det.x, y=det.y, w=det.w, h=det.h,
                      crop_left=left, crop_top=top, crop_right=right, crop_bottom=bottom)
                 for det, (left, top, right, bottom) in zip(detections, boxes, strict=True)]
        session.add_all(faces)
        row.faces = len(faces)
        if faces:
            transition(row, PostState.detected)
        else:
            transition(row, PostState.done, "no face found")
        session.flush()
        return StepOutcome(row.state, row.reason, next_ids=[f.id for f in faces], work=work)
