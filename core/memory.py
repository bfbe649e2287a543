"""Memory a long-lived process frees goes back to the system: glibc's malloc set through the environment
(`returning_memory`: a fixed mmap threshold and two arenas; the supervisor puts it in its children's environment,
the image sets it too) and `tidy()` after tasks, at most once a minute (malloc_trim, linecache cleared).
Why each part: docs/architecture.md, `core/memory.py`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import linecache
import threading
import time
from collections.abc import Mapping

MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(4 * 1024 * 1024), "MALLOC_ARENA_MAX": "2"}
TIDY_EVERY_S = 60.0

_lock = threading.Lock()
_last_tidy = 0.0


def returning_memory(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with glibc told to return big freed blocks; a value the operator set is kept."""
    return {**MALLOC_SETTINGS, **env}


def _malloc_trim() -> int:
    """glibc's malloc_trim(0): 1 when memory went back to the system; 0 elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return 0
    return int(trim(0))


def tidy(now: float | None = None) -> bool:
    """After a task: caches dropped and freed memory trimmed, unless done in the last TIDY_EVERY_S seconds
    (a trim walks the heap: milliseconds, not worth paying per task). Returns whether it ran."""
    global _last_tidy
    now = time.monotonic() if now is None else now
    with _lock:
        if now - _last_tidy < TIDY_EVERY_S:
            return False
        _last_tidy = now
    linecache.clearcache()
    _malloc_trim()
    return True
