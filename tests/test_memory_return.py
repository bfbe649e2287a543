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


# eight threads allocate and free ~800 MB of small blocks, a few survivors pinning pages (as the io pool's
# threads do over many downloads); RSS after the frees, then after core.memory.tidy()
TIDY_SCRIPT = """
import json, threading
from core.memory import tidy

def rss_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

survivors = []
def work():
    chunks = [bytearray(500 + (j * 37) % 3000) for j in range(60000)]
    survivors.append(chunks[::97])
    del chunks

threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
freed = rss_mib()
first, again = tidy(now=1e9), tidy(now=1e9 + 1)
print(json.dumps({"freed": freed, "tidied": rss_mib(), "first": first, "again": again}))
"""


def test_tidy_after_tasks_gives_freed_small_blocks_back(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", TIDY_SCRIPT], env=returning_memory(dict(os.environ)), cwd=PROJECT_ROOT,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rss = json.loads(done.stdout)
    assert rss["first"] and not rss["again"], rss  # once a minute at most
    # malloc keeps freed small blocks in its arenas (here ~500 MiB); the trim returns most of them
    assert rss["freed"] > 300 and rss["tidied"] < rss["freed"] / 3, rss


def test_a_worker_loads_its_steps_and_decoders_at_start() -> None:
    """Late imports grew a long-running worker's memory at the first odd picture: they happen at start."""
    script = (
        "import sys; from worker.app import _steps_loaded_at_start as ready; "
        "before = {m for m in ('numpy', 'download.step', 'detect.step') if m in sys.modules}; ready(); "
        "print(sorted(before), 'numpy' in sys.modules, 'download.step' in sys.modules, 'detect.step' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "True", "True", "True"], done.stdout
