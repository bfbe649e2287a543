"""The `processes` marker kept true: a test that starts a service process must carry it.

`make test-fast` runs `-m "not processes"`. While a test without the marker runs (its fixtures included),
every `subprocess.Popen` (asyncio's subprocesses and Selenium's driver go through it too) is checked: one
that starts a service (a Celery worker, beat or Flower; `waifu run`, `web`, `worker`, `beat`, `scrape`
without `--once`; a browser or its driver; tmux; podman; redis-server) and is still running after
SERVICE_GRACE_S (so not refused at argument parsing) is killed and fails the test, asking for the marker.
Short commands (`waifu status`, `docker-compose config`, a `python -c` probe) stay allowed.
`WAIFU_TEST_PROCESS_LOG=FILE` appends every started command line, with the test, to FILE.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

MARKER = "processes"
SERVICE_PROGRAMS = {"chromium", "chromedriver", "chrome", "tmux", "podman", "redis-server", "flower"}
SERVICE_VERBS = {"run", "web", "worker", "beat", "scrape"}  # `waifu VERB`; `scrape --once` ends by itself
CELERY_SERVICES = {"worker", "beat", "flower"}
SERVICE_GRACE_S = 60.0  # generous: a refused `waifu run` under a loaded machine still ends well within it


def argv_of(args: object) -> list[str]:
    if isinstance(args, str | bytes | os.PathLike):
        return [os.fsdecode(args)]
    return [os.fsdecode(a) for a in args]  # type: ignore[union-attr]


def service_started(argv: Sequence[str]) -> str | None:
    """What service `argv` starts, or None for a command that ends by itself."""
    if not argv:
        return None
    names = [Path(a).name for a in argv]
    if names[0] in SERVICE_PROGRAMS:
        return names[0]
    if names[0] in {"bash", "sh"} and len(argv) > 2 and argv[1] == "-c":  # a shell line: its words
        return service_started(argv[2].split())
    if "celery" in names:
        rest = set(argv[names.index("celery") + 1 :])
        if rest & CELERY_SERVICES:
            return "celery " + " ".join(sorted(rest & CELERY_SERVICES))
    for module in ("waifu.cli", "waifu"):
        if module in argv or names[0] == "waifu":
            start = argv.index(module) + 1 if module in argv else 1
            verbs = [a for a in argv[start:] if not a.startswith("-")]
            if verbs and verbs[0] in SERVICE_VERBS and not (verbs[0] == "scrape" and "--once" in argv):
                return f"waifu {verbs[0]}"
            return None
    return None


def ends_by_itself(pid: int, seconds: float) -> bool:
    """Whether process `pid` exits within `seconds`; it is not reaped (its Popen, or asyncio, does that)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # already reaped (asyncio's child watcher thread): it ended
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(autouse=True)
def _processes_checked(request: pytest.FixtureRequest) -> Iterator[None]:
    """Autouse, so it wraps the test's other fixtures' set-up and tear-down as well as the test."""
    marked = request.node.get_closest_marker(MARKER) is not None
    log = os.environ.get("WAIFU_TEST_PROCESS_LOG")
    original = subprocess.Popen.__init__
    started: list[str] = []

    def checked_init(self: subprocess.Popen, args: object, *rest: object, **kwargs: object) -> None:
        argv = argv_of(args)
        service = service_started(argv)
        if log:
            with open(log, "a", encoding="utf-8") as out:
                out.write(f"{request.node.nodeid}\t{'marked' if marked else '-'}\t{service or '-'}\t{argv[:8]}\n")
        original(self, args, *rest, **kwargs)
        if service and not marked and not ends_by_itself(self.pid, SERVICE_GRACE_S):
            self.kill()
            self.wait()
            started.append(service)
            raise RuntimeError(
                f"{request.node.nodeid} starts {service} without @pytest.mark.{MARKER} "
                f"(tests/support/processes.py): mark it, so `make test-fast` leaves it out"
            )

    subprocess.Popen.__init__ = checked_init  # type: ignore[method-assign]
    try:
        yield
    finally:
        subprocess.Popen.__init__ = original  # type: ignore[method-assign]
    if started:
        pytest.fail(f"started {', '.join(started)} without @pytest.mark.{MARKER}", pytrace=False)
