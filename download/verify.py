"""Is a fetched file an image we keep? One of our formats, under the pixel cap, intact to the last byte."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from core.errors import Refused
from core.images import IMAGE_FORMATS, open_image, own_pixel_check, why_broken
from core.settings import Settings

# MPO is how Pillow reports multi-picture JPEGs (camera files): still a .jpg
FORMAT_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp"}


def verify_image(path: Path, settings: Settings) -> tuple[str, int, int]:
    """Returns (format, width, height) as stored in the file. The shared loader refuses what is not an
    image, a pixel bomb (before decoding it) and a truncated file (by decoding it); Pillow's verify()
    then checks what decoding skips (PNG chunk checksums)."""
    open_image(path, settings.max_image_pixels)
    fmt = ""
    try:
        with own_pixel_check(), Image.open(path, formats=IMAGE_FORMATS) as im:
            fmt, (width, height) = im.format or "", im.size
            im.verify()
    except (OSError, SyntaxError, ValueError) as exc:
        raise Refused(f"broken image ({fmt or 'unknown format'}): {why_broken(exc)}") from exc
    if fmt not in FORMAT_EXTENSIONS:
        raise Refused(f"unsupported image format {fmt!r}")
    return fmt, width, height
