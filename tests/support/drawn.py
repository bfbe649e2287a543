"""Pictures drawn in the test with Pillow, for tests that need real image files but no anime face."""

from __future__ import annotations

import functools
import hashlib
import io
import random

from PIL import Image, ImageDraw


# the same seed always draws the same bytes, and the big ones take most of a second: drawn once a run
@functools.lru_cache(maxsize=64)
def drawn_image(seed: int | str, size: tuple[int, int] = (160, 120), fmt: str = "PNG") -> bytes:
    """A decodable picture of random shapes on grain; two seeds never give the same bytes (no accidental reposts)."""
    rng = random.Random(str(seed))
    width, height = size
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(width), rng.randrange(height)
        box = (x, y, x + rng.randrange(4, width // 2 + 5), y + rng.randrange(4, height // 2 + 5))
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    # grain, as scans and JPEG artefacts give real pictures: the file is not a few hundred bytes of flat colour
    grain = Image.frombytes("L", size, rng.randbytes(width * height)).convert("RGB")
    image = Image.blend(image, grain, 0.12)
    draw = ImageDraw.Draw(image)
    # the seed's digest as a band of pixels across the top: distinct seeds, distinct pixels, even as JPEG
    digest = hashlib.sha256(str(seed).encode()).digest()
    for i in range(min(len(digest) // 3, width // 4)):
        draw.rectangle((i * 4, 0, i * 4 + 3, 3), fill=tuple(digest[i * 3 : i * 3 + 3]))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()
