"""Name the faces of one image with a classifier: detect, crop as the pipeline does, rank the classes.
Reads the model registry (database) to find the current model; never needs the broker."""

from __future__ import annotations

from typing import Any

from PIL import Image

from core.settings import Settings, get_settings

WHOLE_IMAGE_MAX_SIDE = 160  # an image this small with no detection is taken to be a face crop


def load_current(settings: Settings | None = None):
    """(model version row, classifier) of the current model, or (None, None) when there is none yet."""
    from db.engine import session_scope
    from train.registry import current_version

    settings = settings or get_settings()
    with session_scope(readonly=True) as session:
        current = current_version(session)
    if current is None or not current.artifact_dir:
        return None, None
    return current, load_version(current, settings)


def load_version(version, settings: Settings | None = None):
    """The classifier of a model version row (one with an artifact dir); imports TensorFlow."""
    from train.model import load_artifacts

    settings = settings or get_settings()
    return load_artifacts(settings.data_dir / version.artifact_dir)


def classify_image(
    classifier: Any,
    image: Image.Image,
    settings: Settings | None = None,
    k: int = 3,
    detections: list | None = None,
) -> list[dict[str, Any]]:
    """Every face of `image` (an RGB image from core.images.open_image): its name (or "unknown") and top-k.
    `detections`: the faces already found (`waifu predict` finds them in a time-bounded child), else found here."""
    import numpy as np

    from crop.imaging import crop_face
    from detect.boxes import square_crop_box
    from detect.detectors import Detection, find_faces
    from train.model import name_of, predict, top_k

    settings = settings or get_settings()
    if detections is None:
        detections = find_faces(image, settings.detector, settings)
    if not detections and max(image.size) <= WHOLE_IMAGE_MAX_SIDE:
        detections = [Detection(0, 0, image.width, image.height, "whole-image", None)]
    if not detections:
        return []
    crops = np.stack(
        [
            np.asarray(
                crop_face(
                    image,
                    square_crop_box(d, image.size, settings.face_margin)
                    if d.detector != "whole-image"
                    else (0, 0, image.width, image.height),
                    size=settings.face_size,
                )
            )
            for d in detections
        ]
    )
    probabilities = predict(classifier, crops)
    ranked = top_k(classifier, probabilities, k=k)
    threshold = float(classifier.threshold)
    # `name` is the answer: the best guess, or "unknown" when its probability is under the model's threshold
    # (chosen at training time on held-out faces); `top` always shows the guesses and their probabilities
    return [
        {
            "box": [d.x, d.y, d.w, d.h],
            "detector": d.detector,
            "name": name_of(classifier, row),
            "threshold": round(threshold, 4),
            "top": [{"name": name, "p": round(float(p), 4)} for name, p in top],
        }
        for d, row, top in zip(detections, probabilities, ranked, strict=True)
    ]
