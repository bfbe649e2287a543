"""The crop itself: pure Pillow, no database. The box comes from detect.boxes."""

from __future__ import annotations

from PIL import Image


def crop_face(image: Image.Image, box: tuple[int, int, int, int], size: int = 96) -> Image.Image:
    return image.convert("RGB").crop(box).resize((size, size), Image.Resampling.LANCZOS)
