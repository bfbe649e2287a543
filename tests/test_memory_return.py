"""Long-lived workers give big freed blocks back to the system (core.memory): after verifying large 16-bit
pictures in threads, as the io worker does, the process's memory is back near where it started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from core.memory import MALLOC_SETTINGS, returning_memory
from tests.support.env import PROJECT_ROOT

# three io threads each verify a 40 MP 16-bit PNG (what a soak's io worker met); the RSS before and after
SCRIPT = """
import json, sys, threading
from pathlib import Path
from PIL import Image, ImageDraw
from core.settings import get_settings
from download.verify import verify_image

def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

folder = Path(sys.argv[1])
before = rss_mib()

def work(i):
    side = int(40e6 ** 0.5)
    im = Image.new("I;16", (side, side), 0)
    ImageDraw.Draw(im).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=40000)
    path = folder / f"{i}.png"
    im.save(path, compress_level=1)
    del im
    verify_image(path, get_settings())

threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"before": before, "after": rss_mib()}))
"""


def rss_around_verification(env: dict[str, str], folder: Path) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder)], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_workers_environment_returns_freed_pictures_to_the_system(tmp_path: Path) -> None:
    plain = {k: v for k, v in os.environ.items() if k not in MALLOC_SETTINGS}
    rss = rss_around_verification(returning_memory(plain), tmp_path)
    # without the setting this grew by 120-280 MiB here (3 x 80 MB of 16-bit pixels kept by malloc)
    assert rss["after"] - rss["before"] < 64, rss


def test_an_operators_own_malloc_setting_is_kept() -> None:
    assert returning_memory({"MALLOC_MMAP_THRESHOLD_": "65536"})["MALLOC_MMAP_THRESHOLD_"] == "65536"
    assert returning_memory({})["MALLOC_MMAP_THRESHOLD_"] == str(4 * 1024 * 1024)
