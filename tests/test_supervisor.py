"""The supervisor under `waifu run` and `waifu worker --queues io,cpu`, with small real child processes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from waifu.supervisor import ChildLog, Supervisor, supervise

SLEEPER = [sys.executable, "-c", "import time; print('sleeping', flush=True); time.sleep(120)"]


def test_a_child_that_dies_stops_the_others_and_its_last_lines_are_kept(tmp_path: Path) -> None:
    output = ChildLog(tmp_path / "run.log")
    supervisor = Supervisor(env=dict(os.environ), output=output)
    dying = [sys.executable, "-c", "import sys, time; time.sleep(0.5); print('boom: bad setting'); sys.exit(3)"]
    code = supervise(supervisor, [("steady", SLEEPER), ("dying", dying)])
    output.close()
    assert code == 1 and supervisor.died is not None and supervisor.died.name == "dying"
    assert supervisor.died.proc.returncode == 3
    steady = supervisor.children[0]
    assert steady.proc.returncode == -signal.SIGTERM, "the others are stopped, not left running"
    assert output.tail("dying") == ["boom: bad setting"]
    lines = (tmp_path / "run.log").read_text().splitlines()
    assert "dying | boom: bad setting" in lines and "steady | sleeping" in lines


def test_sigterm_stops_every_child_and_ends_cleanly(tmp_path: Path) -> None:
    output = ChildLog(tmp_path / "run.log")
    supervisor = Supervisor(env=dict(os.environ), output=output)
    ticks = []

    def tick() -> None:
        ticks.append(1)
        if len(ticks) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what `docker compose stop` sends to `waifu worker`

    before = signal.getsignal(signal.SIGTERM)
    code = supervise(supervisor, [("a", SLEEPER), ("b", SLEEPER)], tick=tick, tick_every=0.2)
    output.close()
    assert code == 0 and supervisor.died is None and len(ticks) == 2
    assert [c.state for c in supervisor.children] == [f"exited {-signal.SIGTERM}"] * 2
    assert signal.getsignal(signal.SIGTERM) == before, "the caller's handler is back"


@pytest.mark.processes  # starts redis-server
def test_the_embedded_redis_listens_at_the_configured_url_when_it_can(tmp_path: Path) -> None:
    import socket

    import redis

    from waifu.embedded_redis import _free_port, embedded_redis_url, start_embedded_redis

    port = _free_port()
    # the configured loopback port is free: there, so other terminals find it with the same settings
    assert embedded_redis_url(f"redis://127.0.0.1:{port}/3") == f"redis://127.0.0.1:{port}/3"
    assert embedded_redis_url("redis://redis.example:6379/0") != "redis://redis.example:6379/0"
    assert not embedded_redis_url("redis://127.0.0.1:1/0").startswith("redis://127.0.0.1:1/")  # privileged
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        assert embedded_redis_url(f"redis://127.0.0.1:{port}/0") != f"redis://127.0.0.1:{port}/0"

    proc, url = start_embedded_redis(tmp_path, f"redis://127.0.0.1:{port}/2")
    try:
        assert url == f"redis://127.0.0.1:{port}/2"
        assert redis.Redis.from_url(url).ping()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert (tmp_path / "redis" / "redis.log").exists()


def test_a_crashed_child_starts_again_and_the_others_keep_running(tmp_path: Path) -> None:
    """What a broker restart does to a Celery worker (kombu's reconnect raising): one child dies, and
    `waifu run` must go on with it started again, not stop the whole service."""
    from waifu.supervisor import RestartPolicy

    output = ChildLog(tmp_path / "run.log")
    supervisor = Supervisor(env=dict(os.environ), output=output)
    marker = tmp_path / "crashed-once"
    # crashes on its first start only, like a worker killed by a transient broker outage
    flaky = [sys.executable, "-c", f"import os, sys, time; from pathlib import Path; m = Path({str(marker)!r})\n"
             "if not m.exists(): m.touch(); print('lost the broker', flush=True); sys.exit(1)\n"
             "print('back', flush=True); time.sleep(120)"]  # fmt: skip
    seen: list[str] = []

    def tick() -> None:
        seen.append(supervisor.children[1].state if len(supervisor.children) > 1 else "")
        if supervisor.children[1].state.startswith("running (restarted 1x)") and "back" in output.tail("flaky"):
            os.kill(os.getpid(), signal.SIGTERM)

    code = supervise(
        supervisor, [("steady", SLEEPER), ("flaky", flaky)], tick=tick, tick_every=0.2, restart=RestartPolicy(limit=3)
    )
    output.close()
    assert code == 0 and supervisor.died is None, "a crash within the restart limit must not stop the service"
    steady, flaky_child = supervisor.children
    assert len(flaky_child.restarts) == 1 and any(s.startswith("exited 1, restarting") for s in seen), seen
    assert steady.proc.returncode == -signal.SIGTERM, "the steady child ran on until the stop"
    lines = (tmp_path / "run.log").read_text().splitlines()
    assert "flaky | lost the broker" in lines and "flaky | back" in lines


def test_a_child_that_keeps_crashing_stops_everything_once_its_restarts_are_used(tmp_path: Path) -> None:
    from waifu.supervisor import RestartPolicy

    output = ChildLog(tmp_path / "run.log")
    supervisor = Supervisor(env=dict(os.environ), output=output)
    dying = [sys.executable, "-c", "import sys; print('bad setting', flush=True); sys.exit(2)"]
    policy = RestartPolicy(limit=2, window_s=600, max_delay_s=0.2)
    code = supervise(supervisor, [("steady", SLEEPER), ("dying", dying)], restart=policy)
    output.close()
    assert code == 1 and supervisor.died is not None and supervisor.died.name == "dying"
    assert len(supervisor.died.restarts) == 2, "started again exactly `limit` times, then given up"
    assert (tmp_path / "run.log").read_text().count("dying | bad setting") == 3
    assert supervisor.children[0].proc.returncode == -signal.SIGTERM
