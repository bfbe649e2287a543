"""Replace a directory as a whole: a new tree is built beside it, then swapped in with one rename.

Readers see the old export or the new one, never a mix. On Linux the swap is renameat2(RENAME_EXCHANGE),
atomic even when the destination exists; elsewhere (or on a file system without it) the old tree is
renamed aside first and the new one renamed in, with a moment in which the destination is missing; a
crash in that moment leaves the old tree under a `.old` name that the next run puts back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

log = logging.getLogger("waifu.export")

STAGING_PREFIX = ".waifu-export-"  # staging trees sit beside the destination: `.waifu-export-<pid>-<hex>-NAME`
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def staging_dir(destination: Path) -> Path:
    """A fresh, empty directory on the destination's file system (a rename never crosses devices)."""
    path = destination.parent / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{destination.name}"
    path.mkdir(parents=True)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(destination: Path) -> list[Path]:
    """Removes staging trees of exports to `destination` whose process is gone (killed mid-export), and
    puts back an old tree a crash left aside mid-swap. Returns what it removed."""
    removed: list[Path] = []
    aside = _aside(destination)
    if aside.exists() and not destination.exists():
        os.rename(aside, destination)
        log.warning("export: restored %s left aside by an interrupted swap", destination)
    if not destination.parent.is_dir():
        return removed
    for path in destination.parent.glob(f"{STAGING_PREFIX}*-{glob.escape(destination.name)}"):
        pid_text = path.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=False)
            removed.append(path)
    if aside.exists():
        shutil.rmtree(aside)
        removed.append(aside)
    return removed


def _aside(destination: Path) -> Path:
    return destination.parent / f"{STAGING_PREFIX}old-{destination.name}"


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(a, b, RENAME_EXCHANGE); False where the system or file system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if result == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def swap_in(staging: Path, destination: Path) -> None:
    """Makes `staging` the destination and removes the old tree, if any."""
    if not destination.exists():
        os.rename(staging, destination)
        return
    if _exchange(staging, destination):
        shutil.rmtree(staging)  # now the old tree
        return
    aside = _aside(destination)
    os.rename(destination, aside)
    os.rename(staging, destination)
    shutil.rmtree(aside)
