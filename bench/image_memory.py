"""Peak memory of opening a 16-bit greyscale PNG at the pixel cap (issue 17): the float64 conversion core/images.py
used before (about 28 bytes per pixel on top of the image) against today's banded one, same file, same run.

Each way runs in a fresh process and reports its peak RSS above what it held just before the open (Linux: the
peak VmHWM is reset through /proc/self/clear_refs first), so the two are measured alike. The PNG is built once
(a gradient with noise, written by Pillow) at --megapixels (default 20), and the cap is set to its size; the
figures are also scaled to the service's 80 MP cap.

    python -m bench.image_memory [--megapixels 20]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from PIL import Image, ImageOps
import numpy as np
from core import images

def before(image):  # core/images.py's conversion of 16-bit greys until issue 17
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")

path, way, cap = sys.argv[2], sys.argv[3], int(sys.argv[4])
data = open(path, "rb").read()
if way == "before":  # open_image looks to_rgb up at each call
    original = images.to_rgb
    images.to_rgb = lambda image: before(image) if image.mode in images.WIDE_GREYS else original(image)
def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1])

open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
base = status("VmRSS")
image = images.open_image(data, cap)
peak = status("VmHWM")
print(json.dumps({"peak_kib": peak - base, "mode": image.mode, "size": image.size}))
"""


def make_png(path: Path, megapixels: float) -> int:
    import numpy as np
    from PIL import Image

    side = int((megapixels * 1e6) ** 0.5)
    rng = np.random.default_rng(17)
    ramp = np.linspace(0, 65535, side, dtype=np.float32)
    values = (ramp[None, :] * 0.5 + ramp[:, None] * 0.5 + rng.normal(0, 300, (side, side))).clip(0, 65535)
    Image.fromarray(values.astype(np.uint16), "I;16").save(path)
    return side * side


def measure(path: Path, way: str, cap: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), str(path), way, str(cap)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grey16.png"
        pixels = make_png(path, args.megapixels)
        print(f"16-bit grey PNG {pixels / 1e6:.1f} MP, file {path.stat().st_size / 1e6:.1f} MB, cap = its size")
        results = {way: measure(path, way, pixels) for way in ("before", "after")}
    for way, result in results.items():
        per_pixel = result["peak_kib"] * 1024 / pixels
        print(f"{way:>6}: peak +{result['peak_kib'] / 1024:.0f} MiB = {per_pixel:.1f} bytes/pixel ({result['mode']})")
    ratio = results["after"]["peak_kib"] / max(1, results["before"]["peak_kib"])
    at_cap = {way: r["peak_kib"] * 80e6 / pixels / 1024 for way, r in results.items()}
    print(f"after / before: {ratio:.2f} (scaled to the 80 MP cap: {at_cap['before']:.0f} -> {at_cap['after']:.0f} MiB)")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
