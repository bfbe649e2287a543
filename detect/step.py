"""The detect step on a post row: claim it, find the faces with no transaction open (seconds of CPU),
then write one Face row per detection only if the post is still ours. A post in which no face is found
ends `done` with faces=0; a file that cannot be read fails with the reason.

Detections the face check (detect.verify, WAIFU_FACE_VERIFY) judges not a face are kept as `filtered` Face
rows with the reason: never cropped, labelled nor counted in the post's `faces` (so a post with one face and
one filtered detection is a one-face post for the label rule), still visible in `waifu status`."""

from __future__ import annotations

import logging
import time

from core.errors import DetectorUnavailable, Refused
from core.images import open_image
from core.logs import kv
from core.outcome import StepOutcome
from core.settings import Settings
from db.claims import claim, new_token, release, state_of, still_claimed
from db.models import Face, FaceState, Post, PostState, pk

log = logging.getLogger("waifu.detect")

WAITING = PostState.downloaded


def detect_post(post_id: int, settings: Settings, token: str | None = None) -> StepOutcome:
    """Detects every face of a downloaded post and hands the new faces on to the crop step."""
    from db.states import transition
    from detect.boxes import square_crop_box
    from detect.detectors import find_faces, pin_opencv_threads
    from detect.verify import check_faces

    pin_opencv_threads()
    token = token or new_token()
    post = claim(Post, post_id, WAITING, token, settings.claim_timeout_s)
    if post is None:
        return state_of(Post, post_id)  # gone, past this step, or another worker has it now
    started = time.time()
    try:
        if not post.stored_path:
            raise Refused("no stored file to detect faces in")
        image = open_image(settings.data_dir / post.stored_path, settings.max_image_pixels)
        detections = find_faces(image, settings.detector, settings)
        verdicts = check_faces(image, detections, settings) if settings.face_verify else [None] * len(detections)
    except DetectorUnavailable as exc:
        # the machine's fault, not the image's: the row waits (reconcile retries it), it does not fail
        release(Post, post_id, token, f"waiting for the detector: {exc}")
        log.error(kv("detector unavailable", post=post_id, error=exc))
        return StepOutcome(PostState.downloaded, reason=str(exc))
    except Exception as exc:  # a bad file must not stop the queue; the row says what happened
        with still_claimed(Post, post_id, WAITING, token) as (_session, row):
            if row is None:
                return state_of(Post, post_id)
            row.attempts += 1
            detail = str(exc) if isinstance(exc, Refused) else f"{type(exc).__name__}: {exc}"
            transition(row, PostState.failed, f"face detection failed: {detail}")
            return StepOutcome(row.state, row.reason)

    boxes = [square_crop_box(det, image.size, settings.face_margin) for det in detections]
    work = (started, time.time())
    with still_claimed(Post, post_id, WAITING, token) as (session, row):
        if row is None:
            return state_of(Post, post_id)
        faces = [
            Face(
                post_id=pk(row),
                detector=det.detector,
                score=det.score,
                x=det.x,
                y=det.y,
                w=det.w,
                h=det.h,
                crop_left=left,
                crop_top=top,
                crop_right=right,
                crop_bottom=bottom,
                state=FaceState.detected if verdict is None or verdict.face else FaceState.filtered,
                reason=None if verdict is None or verdict.face else verdict.reason,
            )
            for det, verdict, (left, top, right, bottom) in zip(detections, verdicts, boxes, strict=True)
        ]
        session.add_all(faces)
        accepted = [f for f in faces if f.state == FaceState.detected]
        row.faces = len(accepted)  # the label rule counts faces, not detections
        filtered = len(faces) - len(accepted)
        if accepted:
            transition(row, PostState.detected)
        elif filtered:
            transition(row, PostState.done, f"no face found ({filtered} detection(s) judged not a face)")
        else:
            transition(row, PostState.done, "no face found")
        if filtered:
            log.info(kv("detections filtered", post=row.id, detections=len(faces), faces=len(accepted)))
        session.flush()
        return StepOutcome(row.state, row.reason, next_ids=[pk(f) for f in accepted], work=work)
