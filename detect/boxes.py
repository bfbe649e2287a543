"""Face box geometry: the square a face is cut out with, from a detection. Pure arithmetic."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from detect.detectors import Detection


def square_crop_box(det: Detection, image_size: tuple[int, int], margin: float = 0.2) -> tuple[int, int, int, int]:
    """A square around the face, `margin` of its side added on every side, shifted/shrunk to fit the image.

    Returns (left, top, right, bottom) with 0 <= left < right <= width and the same for y.
    """
    width, height = image_size
    side = round(max(det.w, det.h) * (1 + 2 * margin))
    side = max(1, min(side, width, height))
    cx, cy = det.x + det.w / 2, det.y + det.h / 2
    left = int(round(cx - side / 2))
    top = int(round(cy - side / 2))
    left = min(max(0, left), width - side)
    top = min(max(0, top), height - side)
    return left, top, left + side, top + side
