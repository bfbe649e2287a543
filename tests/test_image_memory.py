"""Issue 17: a 16-bit PNG converts with bounded memory. core/images.py scaled 16-bit greys in float64 over the
whole image (about 28 bytes per pixel on top of it: 2.1 GiB at the 80 MP cap, from a small file); by bands of
rows the whole open costs a few bytes per pixel. Measured in a fresh process: its peak RSS (VmHWM, reset
through /proc/self/clear_refs just before the open) above what it held then."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.images import open_image
from tests.support.env import PROJECT_ROOT

# the open's whole cost: the decoded 16-bit image (2 B), the 8-bit grey (1 B), the RGB result (4 B in Pillow)
MAX_BYTES_PER_PIXEL = 10

CHILD = r"""
import json, sys
import numpy  # a fixed cost, not one per pixel: loaded before the baseline
from core.images import open_image
data = open(sys.argv[1], "rb").read()
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field + ":")).split()[1])
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
image = open_image(data, int(sys.argv[2]))
print(json.dumps({"kib": status("VmHWM") - base, "mode": image.mode, "size": list(image.size)}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_a_16_bit_png_at_the_cap_opens_in_a_few_bytes_per_pixel(tmp_path: Path) -> None:
    side = 2000
    ramp = np.linspace(0, 65535, side, dtype=np.uint32)
    values = ((ramp[None, :] + ramp[:, None]) // 2).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values, "I;16").save(path)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(side * side)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mode"] == "RGB" and result["size"] == [side, side]
    per_pixel = result["kib"] * 1024 / (side * side)
    print(f"open_image of a 16-bit PNG: {per_pixel:.1f} bytes per pixel at its peak")
    assert per_pixel < MAX_BYTES_PER_PIXEL, f"{per_pixel:.1f} bytes per pixel"


def test_banded_scaling_rounds_like_the_float_formula(tmp_path: Path) -> None:
    """Every 16-bit value maps to round(v * 255 / 65535), as the float conversion did."""
    from core.images import scaled_grey

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    image = Image.fromarray(values, "I;16")
    expected = np.clip(values.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(scaled_grey(image)), expected)
    path = tmp_path / "all.png"
    image.save(path)
    assert np.array_equal(np.asarray(open_image(path))[..., 0], expected)
