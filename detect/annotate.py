"""Pictures for people: an image with each detected face boxed and, if given, named."""

from __future__ import annotations

from PIL import Image, ImageDraw

from detect.detectors import Detection

BOX_COLOURS = {"animeface": (255, 64, 64), "lbpcascade": (64, 160, 255)}


def annotate(image: Image.Image, detections: list[Detection], labels: list[str] | None = None) -> Image.Image:
    """A copy of `image` with each face boxed (colour by detector) and, if given, its label written above."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    thickness = max(2, round(max(out.size) / 300))
    for i, det in enumerate(detections):
        colour = BOX_COLOURS.get(det.detector.split("@")[0], (255, 200, 0))  # "@rot-25": a fallback pass
        draw.rectangle([det.x, det.y, det.x + det.w, det.y + det.h], outline=colour, width=thickness)
        text = labels[i] if labels and i < len(labels) else det.detector
        if det.score is not None and not labels:
            text += f" {det.score:.2f}"
        text_box = draw.textbbox((det.x, det.y), text)
        ty = max(0, det.y - (text_box[3] - text_box[1]) - 4)
        draw.rectangle(
            [det.x, ty, det.x + (text_box[2] - text_box[0]) + 4, ty + (text_box[3] - text_box[1]) + 4], fill=colour
        )
        draw.text((det.x + 2, ty + 1), text, fill=(255, 255, 255))
    return out
