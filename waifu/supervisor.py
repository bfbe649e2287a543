"""A supervisor of child processes: starts them in sessions of their own, copies their output into one
prefixed log, restarts a crashed child within a budget (RestartPolicy), and stops them all gracefully on
SIGINT/SIGTERM, killing what outlives the grace period.

`waifu run` (waifu.runner) supervises the whole service with it, `waifu worker --queues io,cpu` its
several Celery workers.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from core.logs import kv
from core.settings import Settings

log = logging.getLogger("waifu.run")

GRACE_S = 30.0  # the default of WAIFU_SHUTDOWN_GRACE_S
WATCH_S = 0.5  # how often the supervisor looks at its children
TAIL_LINES = 20  # lines of a child's output kept to show when it dies


def _pdeathsig_setter() -> Callable[[], None] | None:
    """Resolved here, in the parent: the forked child only makes one libc call before exec."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def set_pdeathsig() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return set_pdeathsig


# In the child: get SIGTERM if the supervisor itself dies (even by SIGKILL), so nothing is orphaned.
die_with_parent = _pdeathsig_setter()


class ChildLog:
    """One file for every child's output, each line prefixed with the child's name; optionally echoed."""

    def __init__(self, path: Path, echo: IO[str] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("ab")
        self._echo = echo
        self._lock = threading.Lock()
        self._tails: dict[str, deque[str]] = {}

    def write(self, name: str, line: bytes) -> None:
        text = line.decode("utf-8", errors="replace").rstrip("\n")
        prefixed = f"{name} | {text}\n"
        with self._lock:
            self._tails.setdefault(name, deque(maxlen=TAIL_LINES)).append(text)
            self._file.write(prefixed.encode())
            self._file.flush()
            if self._echo is not None:
                self._echo.write(prefixed)
                self._echo.flush()

    def pump(self, name: str, stream: IO[bytes]) -> None:
        """Copies a child's output line by line until it closes (run in a thread per child)."""
        with stream:
            for line in iter(stream.readline, b""):
                self.write(name, line)

    def tail(self, name: str) -> list[str]:
        with self._lock:
            return list(self._tails.get(name, ()))

    def close(self) -> None:
        with self._lock:
            self._file.close()


class ChildLogHandler(logging.Handler):
    """The supervisor's own log lines, into the same file as its children's."""

    def __init__(self, output: ChildLog, name: str = "run") -> None:
        super().__init__()
        self.output, self.child = output, name
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.output.write(self.child, self.format(record).encode())
        except Exception:  # a closed file at shutdown must not break logging elsewhere
            self.handleError(record)


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: deque[float] = field(default_factory=deque)  # monotonic times of its restarts
    restart_at: float | None = None  # when a crashed child is due to start again

    @property
    def returncode(self) -> int | None:
        """The exit code of its process (None: not started, or still running)."""
        return self.proc.returncode if self.proc is not None else None

    @property
    def state(self) -> str:
        if self.proc is None:
            return "not started"
        code = self.proc.poll()
        if code is None:
            return "running" if not self.restarts else f"running (restarted {len(self.restarts)}x)"
        return f"exited {code}, restarting" if self.restart_at is not None else f"exited {code}"


@dataclass(frozen=True)
class RestartPolicy:
    """A crashed child starts again after a growing delay (1, 2, 4... s, at most `max_delay_s`), at most
    `limit` times within `window_s`; past that the supervisor gives up and stops everything. Unattended runs
    need this: a Celery worker can die of a broker restart (kombu's reconnect raising), and one dead child
    must not end the whole service."""

    limit: int = 5
    window_s: float = 600.0
    max_delay_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RestartPolicy:
        return cls(settings.run_restart_limit, settings.run_restart_window_s)

    def delay(self, child: Child, now: float) -> float | None:
        """Seconds to wait before restarting `child`, or None when it has used up its restarts."""
        while child.restarts and now - child.restarts[0] > self.window_s:
            child.restarts.popleft()
        if len(child.restarts) >= self.limit:
            return None
        return min(self.max_delay_s, 2.0 ** len(child.restarts))


@dataclass
class Supervisor:
    env: dict[str, str]
    output: ChildLog | None = None  # None: children write to our own stdout/stderr
    children: list[Child] = field(default_factory=list)
    stopping: bool = False
    died: Child | None = None  # the child that exited by itself, which stopped the others
    readers: list[threading.Thread] = field(default_factory=list)
    grace: float = GRACE_S  # WAIFU_SHUTDOWN_GRACE_S: how long stop_all waits before it kills

    def start(self, name: str, argv: list[str], child: Child | None = None) -> None:
        """Start a child; with `child`, start it again in place (views hold the same object)."""
        output = self.output
        captured = output is not None
        # a session of its own: a terminal Ctrl-C reaches only us, and we stop children in order
        proc = subprocess.Popen(
            argv,
            env=self.env,
            start_new_session=True,
            preexec_fn=die_with_parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if captured else None,
            stderr=subprocess.STDOUT if captured else None,
        )
        if child is None:
            self.children.append(Child(name, argv, proc))
        else:
            child.proc, child.restart_at = proc, None
        if output is not None:
            reader = threading.Thread(target=output.pump, args=(name, proc.stdout), name=f"log-{name}", daemon=True)
            reader.start()
            self.readers.append(reader)
        log.info(kv("started", child=name, pid=proc.pid))

    def first_exited(self) -> Child | None:
        """The first child that exited by itself and is not already waiting to start again."""
        return next((c for c in self.children if c.proc and c.proc.poll() is not None and c.restart_at is None), None)

    def restart_due(self, now: float) -> None:
        for child in self.children:
            if child.restart_at is not None and now >= child.restart_at:
                child.restarts.append(now)
                log.warning(kv("restarting", child=child.name, restarts_in_window=len(child.restarts)))
                self.start(child.name, child.argv, child)

    def stop_all(self) -> None:
        """SIGTERM to every child (Celery's warm shutdown: running tasks may finish), then, after the grace
        period, SIGKILL to each child's whole process group: a pool process stuck in C code that never
        returns would make the warm shutdown wait forever. The killed tasks' rows are taken up again
        (their messages are redelivered, or reconcile finds them once their claims run out)."""
        for child in reversed(self.children):
            if child.proc and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(kv("kill", child=child.name, reason=f"still running {self.grace:g} s after SIGTERM"))
                kill_group(child.proc)
                child.proc.wait()
            kill_group(child.proc, quiet=True)  # a pool process its parent left behind
            log.info(kv("stopped", child=child.name, code=child.proc.returncode))
        for reader in self.readers:
            reader.join(timeout=5)  # the last lines of every child reach the file


def kill_group(proc: subprocess.Popen, quiet: bool = False) -> None:
    """SIGKILL to the child's process group (it leads its own session): the child and its pool processes."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    if not quiet:
        log.warning(kv("killed", pid=proc.pid))


def supervise(
    supervisor: Supervisor,
    commands: list[tuple[str, list[str]]],
    tick: Callable[[], None] | None = None,
    tick_every: float = 2.0,
    restart: RestartPolicy | None = None,
) -> int:
    """Starts the children and watches them until SIGINT/SIGTERM (returns 0) or until one exits by itself
    (returns 1) and `restart` (None: no restarts) does not allow starting it again; then stops every child
    gracefully. `tick` runs every `tick_every` seconds meanwhile."""

    def request_stop(signum: int, _frame: object) -> None:
        supervisor.stopping = True
        log.info(kv("stopping", signal=signal.Signals(signum).name))

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        for name, argv in commands:
            supervisor.start(name, argv)
        next_tick = 0.0
        while not supervisor.stopping:
            now = time.monotonic()
            exited = supervisor.first_exited()
            if exited is not None:
                delay = restart.delay(exited, now) if restart is not None else None
                if delay is None:
                    supervisor.died = exited
                    why = "no restarts left" if restart is not None and restart.limit else "restarts off"
                    log.error(kv("child exited", child=exited.name, code=exited.returncode, then=why))
                    code = 1
                    break
                exited.restart_at = now + delay
                last = " | ".join(supervisor.output.tail(exited.name)[-3:]) if supervisor.output else ""
                log.error(kv("child exited", child=exited.name, code=exited.returncode, restart_in_s=delay, last=last))
            supervisor.restart_due(now)
            if tick is not None and time.monotonic() >= next_tick:
                tick()
                next_tick = time.monotonic() + tick_every
            time.sleep(WATCH_S)
    finally:
        supervisor.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
