"""The one way every part opens an image: a user's file, a downloaded one, a stored crop.

Pixels are decoded before the file is closed (a lazy Pillow image outlives its file only until the first
pixel access), EXIF orientation is applied (so boxes and crops agree with what a person sees), the first
frame of an animation is taken, and every mode ends as 8-bit RGB. Anything that is not a readable image,
or is larger than the pixel cap, is refused with one readable sentence.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import cast

from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import Refused

# the decoders tried on files we did not make (no EPS through Ghostscript, no PSD...); JPEG also yields MPO
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
DEFAULT_MAX_PIXELS = 80_000_000

_PILLOW_GUARD = threading.Lock()


@contextmanager
def own_pixel_check() -> Iterator[None]:
    """Pillow's bomb guard raises before the size is known and warns below it; lift it around our own
    open only (we check the size ourselves, with a readable reason) and restore it for the rest of the
    process."""
    with _PILLOW_GUARD:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with alpha dropped, as OpenCV's imread does: the detectors' published rates were measured
    so (composing on white lowered lbpcascade from 92.5 % to 88.8 % on the shared set). Going through RGBA
    keeps palette transparency from warning; 16- and 32-bit greys are scaled, not clipped to white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA", "LA"):
        return image.convert("RGBA").convert("RGB")
    if image.mode in WIDE_GREYS:
        return scaled_grey(image).convert("RGB")
    return image.convert("RGB")


WIDE_GREYS = ("I;16", "I;16B", "I;16L", "I", "F")
BAND_PIXELS = 1 << 18  # pixels scaled at a time: the temporaries stay a few MB whatever the image's size


def scaled_grey(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit grey image scaled to 8 bits (round to nearest), one band of rows at a time.

    Converting the whole image at once in float64 cost about 28 bytes per pixel on top of the image itself
    (2.1 GiB for a 16-bit PNG at the 80 MP cap, from a file of a few hundred KB); by bands the cost is the
    8-bit result plus a few MB."""
    import numpy as np

    width, height = image.size
    rows = max(1, BAND_PIXELS // max(1, width))
    if image.mode.startswith("I;16"):
        top = 65535
    else:  # 32-bit: 8-bit values stored wide keep their scale, anything larger is taken as 16-bit
        _low, high = cast("tuple[float, float]", image.getextrema())  # one band: (low, high)
        top = 65535 if high > 255 else 255
    grey = np.empty((height, width), dtype=np.uint8)
    for start in range(0, height, rows):
        band = np.asarray(image.crop((0, start, width, min(height, start + rows))))
        if image.mode == "F":
            scaled = np.clip(band.astype(np.float64) / top * 255.0 + 0.5, 0, 255)
        else:  # integers: round(v * 255 / top) exactly (16-bit values fit 32-bit integers on the way)
            wide = band.astype(np.int64 if image.mode == "I" else np.int32)
            scaled = np.clip((wide * 510 + top) // (2 * top), 0, 255)
        grey[start : start + rows] = scaled
    return Image.fromarray(grey, "L")


# first bytes -> what the file is, for a readable refusal; ours first, then what people often try
SIGNATURES = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF8", "GIF"),
    (8, b"WEBP", "WEBP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"8BPS", "Photoshop (PSD)"),
    (4, b"ftypavi", "AVIF"),
    (4, b"ftyphei", "HEIF"),
    (4, b"ftypmif1", "HEIF"),
    (0, b"\xff\x0a", "JPEG XL"),
    (4, b"JXL ", "JPEG XL"),
    (0, b"%PDF", "PDF"),
    (0, b"PK\x03\x04", "ZIP"),
)


def sniff(head: bytes) -> str | None:
    """The format the first bytes announce, or None."""
    return next((name for at, magic, name in SIGNATURES if head[at : at + len(magic)] == magic), None)


def head_of(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(16)
    except OSError:
        return b""


def describe(path: Path) -> str:
    """What a file that is not an image looks like, for a person."""
    return "a directory" if path.is_dir() else describe_head(head_of(path))


def describe_head(head: bytes) -> str:
    if not head:
        return "an empty file"
    text = head.lstrip()
    if text.lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    decoded = head.decode("latin-1")
    start = f"starts with {decoded!r}" if decoded.isascii() and decoded.isprintable() else f"starts with {head!r}"
    kind = sniff(head)
    return f"{start}, {kind} format" if kind else start


def why_broken(exc: BaseException) -> str:
    """Pillow's reason in words a person understands (its own wording names decoder internals)."""
    text = str(exc)
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return "the file ends too early (cut short, e.g. by an interrupted download or copy)"
    if "decoder object" in text or "broken data stream" in text:
        return "its data cannot be decoded (damaged or cut short)"
    return text or type(exc).__name__


def open_image(source: Path | str | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A decoded, upright, 8-bit RGB copy of `source` (a path or the file's bytes); the file is closed.

    Raises `Refused` for a missing file, a directory, something that is not an image in one of
    IMAGE_FORMATS, a truncated or broken image, an image over `max_pixels` and a file it may not read."""
    path, data = (None, source) if isinstance(source, bytes) else (Path(source), b"")
    if path is not None and not path.exists():
        raise Refused(f"no such file: {path}")
    if path is not None and path.is_dir():
        raise Refused(f"not an image: {path} is a directory")
    fmt = ""
    try:
        with own_pixel_check(), Image.open(path if path is not None else BytesIO(data), formats=IMAGE_FORMATS) as im:
            fmt, (width, height) = im.format or "", im.size
            if width * height > max_pixels:
                raise Refused(
                    f"image is {width}x{height} = {width * height / 1e6:.0f} MP, over the "
                    f"{max_pixels / 1e6:.0f} MP limit (decompression bomb?)"
                )
            im.seek(0)  # animations: the first frame
            im.load()
            upright = ImageOps.exif_transpose(im)  # a copy whose pixels no longer need the file
            upright = upright if upright is not None else im.copy()
            im.close()  # frees the decoded pixels now: at most one full-depth copy is alive below
        return to_rgb(upright)
    except Refused:
        raise
    except UnidentifiedImageError as exc:
        head = head_of(path) if path is not None else data[:16]
        if sniff(head) in IMAGE_FORMATS:  # one of ours by its first bytes, but its header is damaged
            raise Refused(f"broken image ({sniff(head)}): its header cannot be read (damaged or cut short)") from exc
        what = describe(path) if path is not None else describe_head(head)
        raise Refused(f"not an image: {what} (readable formats: {', '.join(IMAGE_FORMATS)})") from exc
    except OSError as exc:
        if exc.errno is not None:  # the file system's answer (permission denied...), not the decoder's
            raise Refused(f"cannot read {path}: {exc.strerror or exc}") from exc
        raise Refused(broken(fmt, path, data, exc)) from exc
    except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise Refused(broken(fmt, path, data, exc)) from exc


def broken(fmt: str, path: Path | None, data: bytes, exc: BaseException) -> str:
    """`fmt` is empty when Pillow failed while still reading the header: the first bytes (of the file at
    `path`, else of `data`) name it then."""
    fmt = fmt or sniff(head_of(path) if path is not None else data[:16]) or "unknown format"
    return f"broken image ({fmt}): {why_broken(exc)}"


def load_decoders() -> None:
    """Loads what decoding first pulls in lazily (every Pillow plugin, numpy for wide greys): a worker does
    it at start, so its memory is settled before work, not grown by the first odd picture hours later."""
    import numpy  # noqa: F401  (scaled_grey)

    Image.init()
