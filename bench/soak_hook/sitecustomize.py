"""SOAK-ONLY TEST HOOK, never part of the service: bench/soak.py puts this folder on PYTHONPATH of the `waifu run`
it starts, with WAIFU_SOAK_HANG_SIZE=WxH. Face detection of an image of exactly that size then hangs the way C code
does (animeface's k-means loop, issue 17): every catchable signal blocked, so a soft time limit cannot end it;
only a hard limit (SIGKILL) or WAIFU_SOAK_HANG_S does. Without the variable this file does nothing."""

import os
import sys

_SIZE = os.environ.get("WAIFU_SOAK_HANG_SIZE", "")


def _hang() -> None:
    import signal
    import time

    blocked = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGQUIT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        time.sleep(float(os.environ.get("WAIFU_SOAK_HANG_S", "3600")))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _record() -> None:
    """One line per hang started, in WAIFU_SOAK_HANG_LOG (the soak counts them) and on stderr."""
    import time

    line = f"{time.time():.1f} pid {os.getpid()} soak hook: hanging on a {_SIZE} image\n"
    sys.stderr.write(line)
    sys.stderr.flush()
    path = os.environ.get("WAIFU_SOAK_HANG_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)


def _patch(module) -> None:
    size = tuple(int(v) for v in _SIZE.lower().split("x"))
    original = module.find_faces

    def find_faces(image, *args, **kwargs):
        if tuple(image.size) == size:
            _record()
            _hang()
        return original(image, *args, **kwargs)

    module.find_faces = find_faces


if _SIZE:
    import importlib.abc
    import importlib.util

    class _PatchDetectors(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "detect.detectors":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchDetectors())
